"""The Flower side of the ClientPool: messages to chosen nodes through the Grid, replies decoded.

Node ids are random transport details: `discover` maps them to federation indices once, by asking
every node who it is, and everything after that speaks in stable client ids and indices. Secure sums
(SecAgg+, server.secure_sum) take federation indices too and map them through the same table."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.messages import (
    DROP_BRANCH,
    FORGET,
    KEPT_ROWS,
    MEMBERSHIP,
    SECURE_ROWS,
    SECURE_UPDATE,
    TRAIN,
    WHOAMI,
    array_field,
    decode_evaluation,
    decode_identity,
    decode_membership,
    decode_update,
    encode_drop_branch,
    instruction,
    own_part,
    secure_task,
    with_release,
)
from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.replies import FAILED, TIMEOUT, Reply
from fedunlearn.fl.rounds import ProgressHook
from fedunlearn.fl.secure_round import SecureLayout, kept_rows, secure_quorum
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models.base import Arrays
from server.privacy_queries import PrivacyQueries
from server.secure_sum import SecureSumError, secure_sum

PULL_SECONDS = 0.05
QUERY_SECONDS = 1800.0


class FlowerPool(PrivacyQueries):
    """The transport: discovery, training and evaluation rounds, forks, queries and secure sums.
    The privacy stage's messages (audit, defences) are written in server.privacy_queries."""

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
        releases: Sequence[int] | None = None,
    ) -> tuple[list[Message], list[Reply[Any]]]:
        ids = cached_federation(self.config.data, self.config.run.seed).client_ids
        roles = {index: own_part(self.config, ids[index]) for index in clients}
        told = {role: instruction(self.config, round_number, shared, epochs, ascent, self.branch, *role)
                for role in set(roles.values())}  # fmt: skip
        if self.branch:
            self.reached.update(clients)
        contents = [told[roles[index]] for index in clients]
        if releases is not None:
            contents = [with_release(content, release) for content, release in zip(contents, releases, strict=True)]
        messages = [Message(content, self.node_of[index], kind) for index, content in zip(clients, contents)]
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
        releases: Sequence[int] | None = None,
    ) -> list[Reply[ClientUpdate]]:
        replies, failed = self._send(TRAIN, round_number, clients, shared, done, epochs, ascent, True, releases)
        return [self._decoded(reply, decode_update) for reply in replies] + failed

    def train_summed(
        self, round_number: int, clients: list[int], shared: Arrays, done: ProgressHook, layout: SecureLayout
    ) -> tuple[list[int], list[Reply[ClientUpdate]], np.ndarray]:
        """Secure aggregation: the clients train and keep their upload (each replies with its id only);
        then one SecAgg+ sum over those that did gives the server the sum of their contributions."""
        replies, failed = self._send(TRAIN, round_number, clients, shared, done, tolerate=True)
        trained = sorted(self._sender(reply) for reply in replies)
        if len(trained) < secure_quorum(self.config.defence.secagg_min_clients):  # the server refuses the round
            return trained, failed, np.zeros(layout.size)
        fields = {"round": round_number, "max-examples": layout.max_examples, "epochs": layout.epochs}
        least = self.config.defence.secagg_min_clients
        if least > 1:  # first how many clients touched each row (fl.secure_round)
            counts = self._secure_round_sum(trained, secure_task(self.config, SECURE_ROWS, **fields))
            fields[KEPT_ROWS] = array_field(kept_rows(counts, least))
        summed = self._secure_round_sum(trained, secure_task(self.config, SECURE_UPDATE, **fields))
        return trained, failed, summed

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        replies, _ = self._send(MEMBERSHIP, 0, clients, shared, lambda _: None)
        return self._by_sender(replies, decode_membership, "membership")

    def _by_sender(self, replies: list[Message], decode: Callable[[RecordDict], tuple[str, Any]], what: str
                   ) -> dict[str, Any]:  # fmt: skip
        """Decoded replies keyed by client id, each id checked against the node that sent it (the
        transport's word), once: a reply naming another client would be filed under that client."""
        federation = cached_federation(self.config.data, self.config.run.seed)
        out: dict[str, Any] = {}
        for reply in replies:
            client_id, value = decode(reply.content)
            sender = self._sender(reply)
            if sender < 0 or federation.client_ids[sender] != client_id or client_id in out:
                raise FedUnlearnError(f"a {what} reply from node {reply.metadata.src_node_id} names client "
                                      f"{client_id!r}, not its own or twice: refused")  # fmt: skip
            out[client_id] = value
        return out

    def forget(self, clients: list[int]) -> None:
        self._send(FORGET, 0, clients, None, lambda _: None)

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]:
        replies, failed = self._send(MessageType.EVALUATE, 0, clients, shared, done, tolerate=True)
        return [self._decoded(reply, decode_evaluation) for reply in replies] + failed

    def _decoded(self, reply: Message, decode: Callable[[RecordDict], Any]) -> Reply[Any]:
        """A reply as the checks see it (fl.replies): one that cannot be decoded (missing or extra
        fields, a field of the wrong type) is rejected as "shape" like any other malformed reply,
        instead of stopping the round and losing the other clients' replies with it."""
        sender = self._sender(reply)
        try:
            return Reply(sender, decode(reply.content))
        except Exception as error:  # np.load inside Flower's Array raises EOFError, MemoryError, ...
            return Reply(sender, failure="shape", detail=f"malformed reply: {error}")

    def _secure_sum(self, clients: list[int], task: dict[str, Any], bound: float) -> np.ndarray:
        nodes = [self.node_of[index] for index in clients]
        return secure_sum(self.grid, nodes, task, bound, self.timeout, self._keep if self.keep_replies else None)

    def _secure_round_sum(self, clients: list[int], task: dict[str, Any]) -> np.ndarray:
        """A round's secure sum: a client that refused its contribution (out of range, diverged)
        stops the run with its own one-line reason (secure_sum.SecureSumError)."""
        try:
            return self._secure_sum(clients, task, 1.0)
        except SecureSumError as error:
            raise FedUnlearnError(f"the secure sum of round {task['round']} failed: {error.first_reason}") from None

    def _query(self, kind: str, contents: dict[int, RecordDict]) -> None:
        self._exchange(
            [Message(content, self.node_of[index], kind) for index, content in contents.items()], lambda _: None
        )
