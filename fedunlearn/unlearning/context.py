"""What an unlearning method sees of the server: the round loop's state and the few operations a
calibration, a replay or a retraining needs. `fl.rounds.FederatedServer` provides it; the methods
depend on this protocol only, so the round loop knows no method and no method knows the loop."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from fedunlearn.config import Config
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.rounds import ClientPool
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models.base import Arrays, SplitModel


class UnlearningServer(Protocol):
    config: Config
    model: SplitModel
    client_ids: list[str]
    position: dict[str, int]  # client id -> federation index
    active: list[int]  # federation indices of the clients still present (the leaving ones excluded)
    pool: ClientPool
    history: HistoryStore | None
    initial: Arrays  # the shared parameters before round 1
    shared: Arrays  # the shared parameters now
    calibrations: list[tuple[int, ClientUpdate]]  # FedEraser's calibrated updates at the last event (tests read them)

    def sample(self, round_number: int) -> list[int]: ...

    def train_clients(
        self, round_number: int, clients: list[int], shared: Arrays, epochs: float | None = None, ascent: bool = False
    ) -> list[ClientUpdate]: ...

    def train_round(
        self, round_number: int, clients: list[int], shared: Arrays
    ) -> tuple[Arrays, list[ClientUpdate]]: ...

    def aggregate(self, shared: Arrays, updates: list[ClientUpdate]) -> Arrays: ...

    def aggregate_delta(self, shared: Arrays, updates: list[ClientUpdate]) -> Arrays: ...

    def records_history(self) -> bool: ...

    def roll_back_users(self) -> None: ...

    def restart_server_optimizer(self) -> None: ...

    def training_draws(self, seed: int) -> AbstractContextManager[None]: ...


Method = Callable[[UnlearningServer, int, list[int]], Arrays]


def require_history(server: UnlearningServer, method: str) -> HistoryStore:
    if server.history is None:
        raise RuntimeError(f"{method} needs the update history, but this run keeps none")
    return server.history
