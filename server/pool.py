"""The Flower side of the ClientPool: messages to chosen nodes through the Grid, replies decoded.

Node ids are random transport details: `discover` maps them to federation indices once, by asking
every node who it is, and everything after that speaks in stable client ids and indices. Secure sums
(SecAgg+, server.secure_sum) take federation indices too and map them through the same table."""

from __future__ import annotations

import copy
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.messages import (
    AUDIT_USERS,
    CLASS_SUMS,
    CLOAK_PRODUCTS,
    DEFENCE_END,
    DEFENCE_FINISH,
    DEFENCE_START,
    DEFENCE_STEP,
    DROP_BRANCH,
    FEATURE_SUMS,
    FORGET,
    FOURTH_POWERS,
    LOCAL_AUDIT,
    MEMBERSHIP,
    REGULARISED_STEP,
    TRAIN,
    WHOAMI,
    DefenceStart,
    array_field,
    decode_audit_user,
    decode_evaluation,
    decode_identity,
    decode_membership,
    decode_update,
    encode_attacker,
    encode_defence_start,
    encode_defence_step,
    encode_drop_branch,
    encode_regularised_step,
    instruction,
    secure_task,
)
from fedunlearn.config import Config
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.replies import FAILED, TIMEOUT, Reply
from fedunlearn.fl.rounds import ProgressHook
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.attrcloak import AttributeGradient
from fedunlearn.privacy.common import unpack_class_sums
from fedunlearn.privacy.gaussian import ClassSums
from server.secure_sum import secure_sum

PULL_SECONDS = 0.05
QUERY_SECONDS = 1800.0
CLASS_SUMS_BOUND = 128.0  # |e_i|, |e_i e_j| of every user embedding must stay below this
PRODUCTS_BOUND = 64.0  # AttrCloak: |g_R.g_R|, |g_AU.g_R|, |g_AU.g_AU| of every client must stay below this
FEATURE_SUMS_BOUND = 1.0  # D2D-R: a one-hot class and Fourier features, each within sqrt(2 / F) < 1


class FlowerPool:
    def __init__(self, grid: Grid, config: Config, n_clients: int, keep_replies: bool = False) -> None:
        self.grid = grid
        self.config = config
        self.timeout = QUERY_SECONDS  # discovery, queries and secure sums: a missing reply is an error
        self.keep_replies = keep_replies
        self.replies_seen: list[RecordDict] = []  # every reply's content when kept, for audits and tests
        self.reply_types: list[str] = []  # the message type of each kept reply
        self.branch = ""  # the branch of the clients' state this pool works on: "" is the run's own (see fork)
        self.reached: set[int] = set()  # a fork: the clients it has sent a task to (they hold its branch)
        self.node_of = self._discover(n_clients)

    def _discover(self, n_clients: int) -> dict[int, int]:
        deadline = time.monotonic() + self.timeout
        while len(list(self.grid.get_node_ids())) < n_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(list(self.grid.get_node_ids()))} of {n_clients} Flower nodes connected")
            time.sleep(0.5)
        nodes = sorted(self.grid.get_node_ids())
        messages = [Message(instruction(self.config), node, WHOAMI) for node in nodes]
        node_of: dict[int, int] = {}
        for reply in self._exchange(messages, lambda _: None)[0]:
            _, index = decode_identity(reply.content)
            if index in node_of:
                raise RuntimeError(f"two Flower nodes claim client index {index}: check each node's partition-id")
            node_of[index] = reply.metadata.src_node_id
        missing = sorted(set(range(n_clients)) - set(node_of))
        if missing:
            raise RuntimeError(f"no Flower node serves client indices {missing[:10]}: give each node a partition-id")
        self.client_of = {node: index for index, node in node_of.items()}
        return node_of

    def _exchange(
        self, messages: list[Message], done: ProgressHook, tolerate: bool = False
    ) -> tuple[list[Message], list[Reply[Any]]]:
        """Push the messages and collect their replies. Without `tolerate`, a failed or missing reply
        is an error; with it (rounds of training and evaluation), each becomes a failed `Reply` for
        the server to count, tagged with the node it was sent to, and the round goes on."""
        waiting = set(self.grid.push_messages(messages))
        destination = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
        replies: list[Message] = []
        failed: list[Reply[Any]] = []
        limit = self.config.train.reply_timeout if tolerate else self.timeout
        deadline = time.monotonic() + limit
        while waiting and time.monotonic() <= deadline:
            pulled = list(self.grid.pull_messages(waiting))
            for reply in pulled:
                waiting.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    if not tolerate:
                        raise RuntimeError(f"a Flower client failed: {reply.error.reason}")
                    sender = self.client_of[destination[reply.metadata.reply_to_message_id]]
                    failed.append(Reply(sender, failure=FAILED, detail=str(reply.error.reason)))
                    continue
                replies.append(reply)
                self._keep(reply)
            if pulled:
                done(len(pulled))
            elif waiting:
                time.sleep(PULL_SECONDS)
        if waiting and not tolerate:
            raise RuntimeError(f"{len(waiting)} Flower clients did not reply within {limit:.0f} s")
        failed += [Reply(self.client_of[destination[m]], failure=TIMEOUT) for m in sorted(waiting)]
        return replies, failed

    def _sender(self, reply: Message) -> int:
        """The federation index of the node a reply came from: the transport's word, not the reply's."""
        return self.client_of.get(reply.metadata.src_node_id, -1)

    def _keep(self, reply: Message) -> None:
        if self.keep_replies and reply.has_content():
            self.replies_seen.append(reply.content)
            self.reply_types.append(reply.metadata.message_type)

    def _send(
        self,
        kind: str,
        round_number: int,
        clients: list[int],
        shared: Arrays | None,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
        tolerate: bool = False,
    ) -> tuple[list[Message], list[Reply[Any]]]:
        content = instruction(self.config, round_number, shared, epochs, ascent, self.branch)
        if self.branch:
            self.reached.update(clients)
        messages = [Message(content, self.node_of[index], kind) for index in clients]
        return self._exchange(messages, done, tolerate)

    def fork(self) -> FlowerPool:
        """A pool whose train, evaluate, membership, forget and audit messages work on a new branch of
        each client's private state (clients.branches): a copy the client makes of its own state when
        the branch first reaches it (from the run's own state, also when forking a fork), so the run's
        state stays untouched and no copy is broadcast. `release` drops the branch on the clients it
        reached. Defence messages and secure sums carry no branch. Replies are kept with this pool's."""
        twin = copy.copy(self)
        twin.branch, twin.reached = uuid.uuid4().hex, set()
        return twin

    def release(self) -> None:
        """The fork is done: every client it reached deletes its branch."""
        content = encode_drop_branch(self.config, self.branch)
        self._query(DROP_BRANCH, dict.fromkeys(sorted(self.reached), content))
        self.reached = set()

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[Reply[ClientUpdate]]:
        replies, failed = self._send(TRAIN, round_number, clients, shared, done, epochs, ascent, tolerate=True)
        return [Reply(self._sender(reply), decode_update(reply.content)) for reply in replies] + failed

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        replies, _ = self._send(MEMBERSHIP, 0, clients, shared, lambda _: None)
        return dict(decode_membership(reply.content) for reply in replies)

    def forget(self, clients: list[int]) -> None:
        self._send(FORGET, 0, clients, None, lambda _: None)

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]:
        replies, failed = self._send(MessageType.EVALUATE, 0, clients, shared, done, tolerate=True)
        return [Reply(self._sender(reply), decode_evaluation(reply.content)) for reply in replies] + failed

    def audit_users(self, clients: list[int]) -> list[Arrays]:
        """The simulation's measurement oracle, not part of the protocol: these clients' user parts,
        in the order of `clients`, for the attribute audit's central view (server.audit)."""
        replies, _ = self._send(AUDIT_USERS, 0, clients, None, lambda _: None)
        federation = cached_federation(self.config.data, self.config.run.seed)
        by_id = dict(decode_audit_user(reply.content) for reply in replies)
        return [by_id[federation.client_ids[index]] for index in clients]

    def _secure_sum(self, clients: list[int], task: dict[str, Any], bound: float) -> np.ndarray:
        nodes = [self.node_of[index] for index in clients]
        return secure_sum(self.grid, nodes, task, bound, self.timeout, self._keep if self.keep_replies else None)

    def local_audit(self, attacker: Attacker, clients: list[int]) -> np.ndarray:
        """The sum over these clients of `fedunlearn.privacy.audit.local_outcome`, each run by the client on
        its own embedding and attribute, through SecAgg+. Counts, so rounded to whole numbers."""
        fields = {"attacker": encode_attacker(attacker), "attribute": attacker.attribute}
        return np.rint(self._secure_sum(clients, secure_task(self.config, LOCAL_AUDIT, **fields), 1.0))

    def attribute_classes(self, attribute: str) -> list[str]:
        """The attribute's possible values, sorted (the dataset's schema, not any client's value)."""
        federation = cached_federation(self.config.data, self.config.run.seed)
        return sorted({str(value) for value in federation.dataset.attributes[attribute]})

    def class_sums(
        self,
        attribute: str,
        clients: list[int],
        bound: float = CLASS_SUMS_BOUND,
        classes: list[str] | None = None,
        defence: bool = False,
        null: tuple[int, np.ndarray] | None = None,
    ) -> ClassSums:
        """AttrCloak's per-class sums (count, sum of e, sum of e e^T) over these clients' embeddings
        (`defence`: as defended so far), through SecAgg+; classes are `classes` or the attribute's
        sorted values, shipped to every client. With `null` = (key, class shares) each client
        counts under its public pseudo-class (`attrcloak.null_labels`) instead of its own."""
        classes = classes if classes is not None else self.attribute_classes(attribute)
        fields: dict[str, Any] = {"attribute": attribute, "classes": json.dumps(classes), "defence": defence}
        if null is not None:
            fields |= {"null-key": null[0], "null-shares": array_field(null[1])}
        task = secure_task(self.config, CLASS_SUMS, **fields)
        total = self._secure_sum(clients, task, bound)
        k = len(classes)
        dim = round((np.sqrt(4 * len(total) / k - 3) - 1) / 2)  # len = k (1 + d + d^2)
        sums = unpack_class_sums(total, k, dim)
        return ClassSums(np.rint(sums.counts), sums.sums, sums.outers)

    # AttrCloak on the clients (server.defence drives these): the queries are answered with ids only

    def _query(self, kind: str, contents: dict[int, RecordDict]) -> None:
        self._exchange(
            [Message(content, self.node_of[index], kind) for index, content in contents.items()], lambda _: None
        )

    def defence_start(self, clients: list[int], start: DefenceStart, defending: list[bool] | None) -> None:
        """Each client notes its embedding and classes; `defending[i]`: whether clients[i] defends
        (None: each decides alone, from `start`'s attackers)."""
        flags = defending if defending is not None else [None] * len(clients)
        contents = {index: encode_defence_start(self.config, replace(start, defending=flag))
                    for index, flag in zip(clients, flags, strict=True)}  # fmt: skip
        self._query(DEFENCE_START, contents)

    def fourth_powers(
        self, attribute: str, classes: list[str], means: np.ndarray, global_mean: np.ndarray, clients: list[int],
        bound: float,
    ) -> np.ndarray:  # fmt: skip
        """The sum of each client's `fourth_power_contribution` (original embedding), through SecAgg+."""
        fields = {"attribute": attribute, "classes": json.dumps(classes)}
        fields |= {"means": array_field(means), "global-mean": array_field(global_mean)}
        return self._secure_sum(clients, secure_task(self.config, FOURTH_POWERS, **fields), bound)

    def cloak_products(
        self, step: int, variant: str, gradients: list[AttributeGradient], clients: list[int], bound: float
    ) -> np.ndarray:
        """Broadcast the attribute loss's gradients; the sum of each client's (g_R.g_R, g_AU.g_R,
        g_AU.g_AU) comes back through SecAgg+ (zero from a client that does not defend)."""
        fields: dict[str, Any] = {"step": step, "variant": variant, "attributes": len(gradients)}
        for j, (grad_sums, grad_outers) in enumerate(gradients):
            fields[f"grad-sums-{j}"] = array_field(grad_sums.numpy())
            fields[f"grad-outers-{j}"] = array_field(grad_outers.numpy())
        return self._secure_sum(clients, secure_task(self.config, CLOAK_PRODUCTS, **fields), bound)

    def defence_step(self, clients: list[int], weight: float, lr: float) -> None:
        content = encode_defence_step(self.config, weight, lr)
        self._query(DEFENCE_STEP, dict.fromkeys(clients, content))

    def defence_finish(self, clients: list[int]) -> None:
        self._query(DEFENCE_FINISH, dict.fromkeys(clients, instruction(self.config)))

    # D2D-R and U2U-R on the clients, and the end of defence.compare

    def feature_sums(
        self, attribute: str, classes: list[str], scale: float, seed: int, clients: list[int], bound: float
    ) -> np.ndarray:
        """The sum of each client's D2D-R `feature_contribution` (embedding as defended so far),
        through SecAgg+; the clients build the Fourier features from (scale, seed)."""
        fields = {"attribute": attribute, "classes": json.dumps(classes), "scale": float(scale), "seed": seed}
        return self._secure_sum(clients, secure_task(self.config, FEATURE_SUMS, **fields), bound)

    def regularised_step(self, clients: list[int], method: str, gradients: list[tuple[np.ndarray, ...]],
                         weight: float, lr: float, n_clients: int, scale: float, seed: int) -> None:  # fmt: skip
        content = encode_regularised_step(self.config, method, gradients, weight, lr, n_clients, scale, seed)
        self._query(REGULARISED_STEP, dict.fromkeys(clients, content))

    def defence_end(self, clients: list[int], restore: bool) -> None:
        """After defence.compare: each client drops its trained user part, back to it first if `restore`."""
        content = instruction(self.config)
        content["defence"] = ConfigRecord({"restore": restore})
        self._query(DEFENCE_END, dict.fromkeys(clients, content))
