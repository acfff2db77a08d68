"""Choosing an engine, and the in-process runner: the same client functions as the Flower
ClientApp, called in a loop."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedunlearn.config import Config
from fedunlearn.faults import local_reply
from fedunlearn.federated import (
    ClientEvaluation,
    ClientUpdate,
    init_user,
    local_evaluate,
    local_membership,
    local_train,
)
from fedunlearn.federation import Federation
from fedunlearn.models import Arrays, SplitModel, build_model
from fedunlearn.replies import FAILED, Reply
from fedunlearn.rounds import ProgressHook
from fedunlearn.training import resolve_device

if TYPE_CHECKING:
    from fedunlearn.batched import BatchedPool


def chaotic_under_reordering(config: Config) -> bool:
    """NCF trained with BPR and Adam: BPR cannot see a shift common to all of a user's scores (the
    output bias; the bias of a last-layer unit active for every item), so those gradients are zero
    up to float rounding, and Adam scales that rounding noise up to full-size steps. Any change in
    the order of float sums then sends training down another (equally good) path, so the batched
    engine cannot reproduce the in-process numbers there."""
    return config.model.name == "ncf" and config.model.loss == "bpr" and config.train.optimizer == "adam"


def choose_engine(config: Config) -> str:
    """`auto`: the fastest engine that reproduces the in-process numbers for this configuration
    (batched, within the tolerance in docs/ARCHITECTURE.md), else the in-process runner."""
    if config.run.engine != "auto":
        return config.run.engine
    return "inprocess" if chaotic_under_reordering(config) else "batched"


def make_pool(config: Config, federation: Federation) -> InProcessPool | BatchedPool:
    from fedunlearn.batched import BatchedPool

    return BatchedPool(config, federation) if config.run.engine == "batched" else InProcessPool(config, federation)


class LocalPool:
    """What the single-machine pools share: every client's private state is at hand (`user`)."""

    federation: Federation
    model: SplitModel
    device: torch.device

    def user(self, index: int) -> Arrays:
        raise NotImplementedError

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        return {
            self.federation.client_ids[i]: local_membership(
                self.model, self.federation.client(i), self.user(i), shared, self.device
            )
            for i in clients
        }


class InProcessPool(LocalPool):
    """Holds every client's private state in a dict, as each Flower client holds it in its context."""

    def __init__(self, config: Config, federation: Federation) -> None:
        self.config = config
        self.federation = federation
        self.model = build_model(config.model, federation.n_items)
        self.device = resolve_device(config.run.device)
        self.user_state: dict[int, Arrays] = {}
        torch.set_num_threads(1)  # tiny per-client tensors: threads only add overhead and jitter

    def user(self, index: int) -> Arrays:
        if index not in self.user_state:
            self.user_state[index] = init_user(self.model, self.config.run.seed, self.federation.client_ids[index])
        return self.user_state[index]

    def set_user(self, index: int, user: Arrays) -> None:
        self.user_state[index] = user

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[Reply[ClientUpdate]]:
        replies = []
        ids, n_items = self.federation.client_ids, self.federation.n_items
        for index in clients:
            data = self.federation.client(index)
            update, user = local_train(
                self.model, data, self.user(index), shared, self.config, round_number, self.device, epochs, ascent
            )
            reply = local_reply(self.config, round_number, index, update, ids, n_items)
            if reply.failure != FAILED:  # a client that crashed keeps nothing of the round, as on Flower
                self.user_state[index] = user
            replies.append(reply)
            done(1)
        return replies

    def state(self) -> Arrays:
        """Every client's private state, for the resume checkpoint."""
        indices = sorted(self.user_state)
        keys = next(iter(self.user_state.values())).keys() if indices else ()
        stacked = {f"user.{key}": np.stack([self.user_state[i][key] for i in indices]) for key in keys}
        return {"index": np.array(indices, dtype=np.int64)} | stacked

    def load_state(self, state: Arrays) -> None:
        tables = {key[5:]: value for key, value in state.items() if key.startswith("user.")}
        self.user_state = {
            int(index): {key: table[row].copy() for key, table in tables.items()}
            for row, index in enumerate(state["index"])
        }

    def fork(self) -> InProcessPool:
        """A copy whose clients' private state can change without touching this pool's."""
        twin = copy.copy(self)
        twin.user_state = {index: dict(state) for index, state in self.user_state.items()}
        return twin

    def forget(self, clients: list[int]) -> None:
        """Delete these clients' private state (a later call starts them afresh)."""
        for index in clients:
            self.user_state.pop(index, None)

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]:
        results = []
        for index in clients:
            data = self.federation.client(index)
            results.append(Reply(index, local_evaluate(self.model, data, self.user(index), shared, self.config,
                                                       self.device)))  # fmt: skip
            done(1)
        return results
