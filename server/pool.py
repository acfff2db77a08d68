"""The Flower side of the ClientPool: messages to chosen nodes through the Grid, replies decoded.

Node ids are random transport details: `discover` maps them to federation indices once, by asking
every node who it is, and everything after that speaks in stable client ids and indices. Secure sums
(SecAgg+, server.secure_sum) take federation indices too and map them through the same table."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedunlearn.config import Config
from fedunlearn.federated import ClientEvaluation, ClientUpdate
from fedunlearn.federation import cached_federation
from fedunlearn.messages import (
    CLASS_SUMS,
    FORGET,
    LOCAL_AUDIT,
    MEMBERSHIP,
    TRAIN,
    WHOAMI,
    decode_evaluation,
    decode_identity,
    decode_membership,
    decode_update,
    encode_attacker,
    instruction,
    secure_task,
)
from fedunlearn.models import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.attrcloak import unpack_class_sums
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.rounds import ProgressHook
from server.secure_sum import secure_sum

PULL_SECONDS = 0.05
CLASS_SUMS_BOUND = 128.0  # |e_i|, |e_i e_j| of every user embedding must stay below this


class FlowerPool:
    def __init__(
        self, grid: Grid, config: Config, n_clients: int, keep_replies: bool = False, timeout: float = 1800.0
    ) -> None:
        self.grid = grid
        self.config = config
        self.timeout = timeout
        self.keep_replies = keep_replies
        self.replies_seen: list[RecordDict] = []  # every reply's content when kept, for audits and tests
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
        for reply in self._exchange(messages, lambda _: None):
            _, index = decode_identity(reply.content)
            if index in node_of:
                raise RuntimeError(f"two Flower nodes claim client index {index}: check each node's partition-id")
            node_of[index] = reply.metadata.src_node_id
        missing = sorted(set(range(n_clients)) - set(node_of))
        if missing:
            raise RuntimeError(f"no Flower node serves client indices {missing[:10]}: give each node a partition-id")
        return node_of

    def _exchange(self, messages: list[Message], done: ProgressHook) -> list[Message]:
        waiting = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.monotonic() + self.timeout
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} Flower clients did not reply within {self.timeout:.0f} s")
            pulled = list(self.grid.pull_messages(waiting))
            for reply in pulled:
                if reply.has_error():
                    raise RuntimeError(f"a Flower client failed: {reply.error.reason}")
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                self._keep(reply)
            if pulled:
                done(len(pulled))
            elif waiting:
                time.sleep(PULL_SECONDS)
        return replies

    def _keep(self, reply: Message) -> None:
        if self.keep_replies and reply.has_content():
            self.replies_seen.append(reply.content)

    def _send(
        self,
        kind: str,
        round_number: int,
        clients: list[int],
        shared: Arrays | None,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[Message]:
        content = instruction(self.config, round_number, shared, epochs, ascent)
        messages = [Message(content, self.node_of[index], kind) for index in clients]
        return self._exchange(messages, done)

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[ClientUpdate]:
        replies = self._send(TRAIN, round_number, clients, shared, done, epochs, ascent)
        return [decode_update(reply.content) for reply in replies]

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        replies = self._send(MEMBERSHIP, 0, clients, shared, lambda _: None)
        return dict(decode_membership(reply.content) for reply in replies)

    def forget(self, clients: list[int]) -> None:
        self._send(FORGET, 0, clients, None, lambda _: None)

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[ClientEvaluation]:
        replies = self._send(MessageType.EVALUATE, 0, clients, shared, done)
        return [decode_evaluation(reply.content) for reply in replies]

    def _secure_sum(self, clients: list[int], task: dict[str, Any], bound: float) -> np.ndarray:
        nodes = [self.node_of[index] for index in clients]
        return secure_sum(self.grid, nodes, task, bound, self.timeout, self._keep if self.keep_replies else None)

    def local_audit(self, attacker: Attacker, clients: list[int]) -> np.ndarray:
        """The sum over these clients of `fedunlearn.audit.local_outcome`, each run by the client on
        its own embedding and attribute, through SecAgg+. Counts, so rounded to whole numbers."""
        fields = {"attacker": encode_attacker(attacker), "attribute": attacker.attribute}
        return np.rint(self._secure_sum(clients, secure_task(self.config, LOCAL_AUDIT, **fields), 1.0))

    def class_sums(self, attribute: str, clients: list[int], bound: float = CLASS_SUMS_BOUND) -> ClassSums:
        """AttrCloak's per-class sums (count, sum of e, sum of e e^T) over these clients' embeddings,
        through SecAgg+; classes are the attribute's sorted values, shipped to every client."""
        federation = cached_federation(self.config.data, self.config.run.seed)
        classes = sorted({str(value) for value in federation.dataset.attributes[attribute]})
        task = secure_task(self.config, CLASS_SUMS, attribute=attribute, classes=json.dumps(classes))
        total = self._secure_sum(clients, task, bound)
        k = len(classes)
        dim = round((np.sqrt(4 * len(total) / k - 3) - 1) / 2)  # len = k (1 + d + d^2)
        sums = unpack_class_sums(total, k, dim)
        return ClassSums(np.rint(sums.counts), sums.sums, sums.outers)
