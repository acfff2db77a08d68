"""The in-process runner: the same client functions as the Flower ClientApp, called in a loop."""

from __future__ import annotations

import copy

import torch

from fedunlearn.config import Config
from fedunlearn.federated import (
    ClientEvaluation,
    ClientUpdate,
    init_user,
    local_evaluate,
    local_membership,
    local_train,
)
from fedunlearn.federation import Federation
from fedunlearn.models import Arrays, build_model
from fedunlearn.rounds import ProgressHook
from fedunlearn.training import resolve_device


class InProcessPool:
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

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[ClientUpdate]:
        updates = []
        for index in clients:
            data = self.federation.client(index)
            update, self.user_state[index] = local_train(
                self.model, data, self.user(index), shared, self.config, round_number, self.device, epochs, ascent
            )
            updates.append(update)
            done(1)
        return updates

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]:
        return {
            self.federation.client_ids[i]: local_membership(
                self.model, self.federation.client(i), self.user(i), shared, self.device
            )
            for i in clients
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

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[ClientEvaluation]:
        results = []
        for index in clients:
            results.append(
                local_evaluate(
                    self.model, self.federation.client(index), self.user(index), shared, self.config, self.device
                )
            )
            done(1)
        return results
