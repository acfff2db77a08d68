"""The in-process runner: the same client functions as the Flower ClientApp, called in a loop."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from fedunlearn.config import Config
from fedunlearn.fl.client import UserMoments, init_user, local_evaluate, local_membership, local_train
from fedunlearn.fl.faults import local_reply
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.replies import FAILED, Reply
from fedunlearn.fl.rounds import ProgressHook
from fedunlearn.fl.secure_round import SecureLayout, kept_rows
from fedunlearn.fl.training import resolve_device
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models import build_model
from fedunlearn.models.base import Arrays, SplitModel


class LocalPool:
    """What the single-machine pools share: every client's private state is at hand (`user`)."""

    config: Config
    federation: Federation
    model: SplitModel
    device: torch.device

    def user(self, index: int) -> Arrays:
        raise NotImplementedError

    def set_user(self, index: int, user: Arrays) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """A fork here is a plain copy, gone with the twin that holds it."""

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
        raise NotImplementedError

    def train_summed(
        self, round_number: int, clients: list[int], shared: Arrays, done: ProgressHook, layout: SecureLayout
    ) -> tuple[list[int], list[Reply[ClientUpdate]], np.ndarray]:
        """Secure aggregation simulated: each client's contribution, checked as the client checks
        it, is added into one exact sum in client-id order (after the exact sum of the touched rows
        when defence.secagg_min_clients asks for it); nothing of a single upload is returned."""
        replies = self.train(round_number, clients, shared, done)
        trained = sorted((reply for reply in replies if reply.value is not None),
                         key=lambda reply: self.federation.client_ids[reply.sender])  # fmt: skip
        least = self.config.defence.secagg_min_clients
        kept = None
        if least > 1:
            counts = sum((layout.touched_rows(reply.value) for reply in trained), np.zeros(layout.n_items))
            kept = kept_rows(counts, least)
        total = np.zeros(layout.size)
        for reply in trained:
            layout.add(total, reply.value, kept)
        return [reply.sender for reply in trained], [reply for reply in replies if reply.value is None], total

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        return {
            self.federation.client_ids[i]: local_membership(
                self.model, self.federation.client(i), self.user(i), shared, self.device
            )
            for i in clients
        }


class InProcessPool(LocalPool):
    """Holds every client's private state in a dict, as each Flower client holds it in its context."""

    threads = 1  # tiny per-client tensors: more torch threads only add overhead and jitter

    def __init__(self, config: Config, federation: Federation) -> None:
        self.config = config
        self.federation = federation
        self.model = build_model(config.model, federation.n_items)
        self.device = resolve_device(config.run.device)
        self.user_state: dict[int, Arrays] = {}
        self.keeps_moments = config.train.client_optimizer_state == "user"
        self.moments: dict[int, UserMoments] = {}  # train.client_optimizer_state = "user": each client's Adam state

    def user(self, index: int) -> Arrays:
        if index not in self.user_state:
            client_id = self.federation.client_ids[index]
            self.user_state[index] = init_user(self.model, self.config.run.training_seed(), client_id)
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
        releases: Sequence[int] | None = None,
    ) -> list[Reply[ClientUpdate]]:
        replies = []
        ids, n_items = self.federation.client_ids, self.federation.n_items
        for index, release in zip(clients, releases or [0] * len(clients), strict=True):
            data = self.federation.client(index)
            moments = copy.deepcopy(self._moments(index)) if self.keeps_moments and not ascent else None
            update, user = local_train(
                self.model, data, self.user(index), shared, self.config, round_number, self.device, epochs, ascent,
                moments, release,
            )  # fmt: skip
            reply = local_reply(self.config, round_number, index, update, ids, n_items)
            if reply.failure != FAILED:  # a client that crashed keeps nothing of the round, as on Flower
                self.user_state[index] = user
                if moments is not None:
                    self.moments[index] = moments
            replies.append(reply)
            done(1)
        return replies

    def _moments(self, index: int) -> UserMoments:
        """The client's Adam state (zeros before its first step); local_train updates a copy."""
        kept = self.moments.get(index)
        return UserMoments.zeros(self.user(index)) if kept is None else kept

    def state(self) -> Arrays:
        """Every client's private state, for the resume checkpoint."""
        indices = sorted(self.user_state)
        keys = next(iter(self.user_state.values())).keys() if indices else ()
        stacked = {f"user.{key}": np.stack([self.user_state[i][key] for i in indices]) for key in keys}
        if self.keeps_moments and indices:
            stacked |= UserMoments.stack([self._moments(i) for i in indices]).as_state()
        return {"index": np.array(indices, dtype=np.int64)} | stacked

    def load_state(self, state: Arrays) -> None:
        tables = {key[5:]: value for key, value in state.items() if key.startswith("user.")}
        self.user_state = {
            int(index): {key: table[row].copy() for key, table in tables.items()}
            for row, index in enumerate(state["index"])
        }
        self.moments = {}
        if self.keeps_moments and len(state["index"]):
            stacked = UserMoments.from_state(state, tables)
            self.moments = {int(index): stacked.rows(row) for row, index in enumerate(state["index"])}

    def fork(self) -> InProcessPool:
        """A copy whose clients' private state can change without touching this pool's."""
        twin = copy.copy(self)
        twin.user_state = {index: dict(state) for index, state in self.user_state.items()}
        twin.moments = copy.deepcopy(self.moments)
        return twin

    def forget(self, clients: list[int]) -> None:
        """Delete these clients' private state (a later call starts them afresh)."""
        for index in clients:
            self.user_state.pop(index, None)
            self.moments.pop(index, None)

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]:
        results = []
        for index in clients:
            data = self.federation.client(index)
            results.append(Reply(index, local_evaluate(self.model, data, self.user(index), shared, self.config,
                                                       self.device)))  # fmt: skip
            done(1)
        return results
