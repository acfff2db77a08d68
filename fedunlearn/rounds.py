"""The server's round loop, independent of how messages reach the clients.

Every engine supplies a `ClientPool`; the loop (sampling, aggregation, evaluation schedule, drop
events and the unlearning methods' calibration rounds) is this one class, so the Flower path and
the in-process runner cannot drift apart.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedunlearn.config import Config, audits_privacy
from fedunlearn.errors import FedUnlearnError
from fedunlearn.federated import ClientEvaluation, ClientUpdate, aggregate
from fedunlearn.history import HistoryStore
from fedunlearn.metrics import hit_ratio, ranking_metrics
from fedunlearn.models import Arrays, SplitModel, build_model
from fedunlearn.progress import Progress
from fedunlearn.seeding import Stream, client_uniforms, rng_for

ProgressHook = Callable[[int], None]


class ClientPool(Protocol):
    """Runs the client steps on the chosen clients (by federation index) and returns their replies."""

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
    ) -> list[ClientUpdate]: ...

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[ClientEvaluation]: ...

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]: ...

    def forget(self, clients: list[int]) -> None: ...


@dataclass
class FederationResult:
    rounds: list[dict[str, float]] = field(default_factory=list)  # one row per evaluated round
    final: dict[str, float] = field(default_factory=dict)
    shared: Arrays = field(default_factory=dict)
    round_ends: list[float] = field(default_factory=list)  # wall-clock time.time() at the end of each round
    events: list[dict[str, Any]] = field(default_factory=list)  # drop events: who, when, method, cost, audit
    unlearned: Arrays = field(default_factory=dict)  # shared parameters right after the last unlearning
    comparison: list[dict[str, Any]] = field(default_factory=list)  # every method at the last event
    uploads: np.ndarray | None = None  # (clients, items): the server's view of each last-round upload
    privacy: Any = None  # fedunlearn.privacy.stage.PrivacyReport when attribute privacy was audited


def _by_client(reply: ClientUpdate | ClientEvaluation) -> str:
    return reply.client_id


def sample_clients(seed: int, round_number: int, client_ids: list[str], fraction: float) -> list[int]:
    """Positions of the clients taking part in a round. Each client joins with probability
    `fraction`, decided by a draw keyed by (seed, round, its id) alone, so removing other clients
    never changes whether it is chosen; if nobody is drawn, the client with the lowest draw joins."""
    if fraction >= 1:
        return list(range(len(client_ids)))
    draws = client_uniforms(seed, Stream.SAMPLING, round_number, client_ids)
    chosen = np.flatnonzero(draws < fraction)
    return [int(i) for i in chosen] if len(chosen) else [int(np.argmin(draws))]


def evaluation_metrics(evaluations: list[ClientEvaluation], ks: list[int], full_ranking: bool) -> dict[str, float]:
    metrics = ranking_metrics(np.array([e.rank for e in evaluations]), ks)
    metrics |= ranking_metrics(np.array([e.valid_rank for e in evaluations]), [10], prefix="valid_")
    if full_ranking:
        metrics |= ranking_metrics(np.array([e.full_rank for e in evaluations]), ks, prefix="full_")
    target_ranks = np.array([e.target_rank for e in evaluations if e.target_rank >= 0])
    if len(target_ranks):
        metrics["ER@10"] = hit_ratio(target_ranks, 10)  # exposure of the promoted item
    return metrics


def select_final(rows: list[dict[str, float]], select: str) -> dict[str, float]:
    """The reported row: the last evaluated round, or the one with the best validation HR@10
    (earliest on ties), so the test item never chooses the model it is judged on."""
    if select == "last":
        return dict(rows[-1])
    return dict(max(rows, key=lambda row: row["valid_HR@10"]))


def _release(fork: ClientPool) -> None:
    """A Flower fork's state lives on the clients (a branch of each one's state): drop it there. The
    single-machine pools' forks are plain copies, gone with the twin."""
    release = getattr(fork, "release", None)
    if release is not None:
        release()


class FederatedServer:
    """The server: samples clients among those still present, aggregates, evaluates, keeps the
    history when asked, and at each drop event runs the configured unlearning method."""

    def __init__(
        self,
        config: Config,
        client_ids: list[str],
        n_items: int,
        pool: ClientPool,
        progress: Progress,
        history: HistoryStore | None = None,
        schedule: dict[int, list[str]] | None = None,
    ) -> None:
        self.config = config
        self.client_ids = client_ids
        self.position = {client_id: index for index, client_id in enumerate(client_ids)}
        self.pool = pool
        self.progress = progress
        self.history = history
        self.schedule = schedule or {}
        self.model: SplitModel = build_model(config.model, n_items)
        self.initial = self.model.init_shared(rng_for(config.run.seed, Stream.SHARED_INIT))
        self.shared = self.initial
        excluded = set(config.data.exclude_clients)
        unknown = excluded - set(client_ids)
        if unknown:
            raise FedUnlearnError(f"data.exclude_clients names unknown clients {sorted(unknown)[:5]}")
        # positions of the clients still in the federation
        self.active = [i for i, client in enumerate(client_ids) if client not in excluded]
        self.client_epochs = 0.0
        self.events: list[dict[str, Any]] = []
        self.calibrations: list[tuple[int, ClientUpdate]] = []  # FedEraser's calibrated updates, for audits
        self.unlearned: Arrays = {}  # the shared parameters right after the last unlearning event

    def sample(self, round_number: int) -> list[int]:
        ids = [self.client_ids[i] for i in self.active]
        return [
            self.active[i] for i in sample_clients(self.config.run.seed, round_number, ids, self.config.train.fraction)
        ]

    def train_round(self, round_number: int, clients: list[int], shared: Arrays) -> tuple[Arrays, list[ClientUpdate]]:
        """One round from `shared`: the sampled clients train, the history records, the server aggregates."""
        # replies arrive in any order: sort by client id so every sum runs in the same order
        updates = sorted(self.pool.train(round_number, clients, shared, self.progress.client_done), key=_by_client)
        self.client_epochs += sum(u.epochs for u in updates)
        if self.history is not None:
            self.history.record_round(round_number, shared, updates)
        return aggregate(self.model, shared, updates, self.config.train.server_lr), updates

    def upload_view(self, updates: list[ClientUpdate]) -> np.ndarray:
        """What a curious server keeps of each upload for attribute inference (zeros: not sampled)."""
        from fedunlearn.privacy.uploads import upload_features

        view = np.zeros((len(self.client_ids), self.model.n_items), dtype=np.float32)
        for update in updates:
            view[self.position[update.client_id]] = upload_features(update, self.model.n_items)
        return view

    def evaluate(self) -> dict[str, float]:
        evaluations = sorted(self.pool.evaluate(self.active, self.shared, lambda _: None), key=_by_client)
        return evaluation_metrics(evaluations, self.config.eval.ks, self.config.eval.full_ranking)

    def remove(self, round_number: int, leaving: list[str], method: str | None = None) -> None:
        """Clients leave before `round_number`: unlearn them, then delete every trace of them."""
        from fedunlearn.unlearning import METHODS

        method = method or self.config.unlearn.method
        forgotten = [self.position[c] for c in leaving]
        self.active = [i for i in self.active if i not in set(forgotten)]
        started, epochs_before = time.perf_counter(), self.client_epochs
        self.shared = METHODS[method](self, round_number, forgotten)
        seconds, client_epochs = time.perf_counter() - started, self.client_epochs - epochs_before
        membership = self.pool.membership(forgotten, self.shared)  # before their state is deleted
        self.pool.forget(forgotten)
        if self.history is not None:
            self.history.forget(leaving)
        self.events.append(
            {
                "round": round_number,
                "clients": leaving,
                "method": method,
                "seconds": seconds,
                "client_epochs": client_epochs,
                "after": self.evaluate(),  # retained users, on the model right after unlearning
                "MIA_AUC": float(np.mean([membership[client] for client in sorted(membership)])),  # any arrival order
            }
        )
        self.unlearned = {key: value.copy() for key, value in self.shared.items()}

    def compare_methods(self, round_number: int, leaving: list[str]) -> list[dict[str, Any]]:
        """Every unlearning method tried on a copy of this server at this event (client state and
        history copied), with speedup and distance to Retrain: the unlearning table."""
        from fedunlearn.audit import compare_with_retrain
        from fedunlearn.unlearning import METHODS

        if self.history is None:
            raise FedUnlearnError("unlearn.compare needs a drop schedule (unlearn.drop or unlearn.drop_random)")
        rows, unlearned = [], []
        with tempfile.TemporaryDirectory() as scratch:
            for method in METHODS:
                twin = copy.copy(self)
                twin.pool = self.pool.fork()
                twin.history = self.history.copy_to(Path(scratch) / f"{method}.sqlite")
                twin.active, twin.events, twin.calibrations = list(self.active), [], []
                twin.progress = Progress(0, enabled=False)
                twin.remove(round_number, leaving, method)
                twin.history.close()
                _release(twin.pool)
                event = twin.events[-1]
                rows.append(
                    {"method": method, "model": self.config.model.name, "seed": self.config.run.seed}
                    | {k: v for k, v in event["after"].items() if k in ("HR@10", "NDCG@10", "ER@10")}
                    | {"MIA_AUC": event["MIA_AUC"], "unlearn_seconds": event["seconds"]}
                    | {"client_epochs": event["client_epochs"]}
                )
                unlearned.append(twin.unlearned)
        compare_with_retrain(rows, unlearned)
        return rows

    def run(self) -> FederationResult:
        result = FederationResult()
        started = time.perf_counter()
        rounds = self.config.train.rounds
        for round_number in range(1, rounds + 1):
            if round_number in self.schedule:
                if self.config.unlearn.compare:
                    result.comparison = self.compare_methods(round_number, self.schedule[round_number])
                self.remove(round_number, self.schedule[round_number])
            clients = self.sample(round_number)
            self.progress.start_round(round_number, len(clients))
            self.shared, updates = self.train_round(round_number, clients, self.shared)
            if round_number == rounds and audits_privacy(self.config):
                result.uploads = self.upload_view(updates)
            if round_number % self.config.eval.every == 0 or round_number == rounds:
                row = {
                    "round": round_number,
                    "clients": len(clients),
                    "train_loss": float(np.mean([u.loss for u in updates])),
                    **self.evaluate(),
                    "seconds": time.perf_counter() - started,
                }
                result.rounds.append(row)
                self.progress.evaluated(row)
            result.round_ends.append(time.time())
            self.progress.end_round()
        result.final = select_final(result.rounds, self.config.eval.select)
        result.shared = self.shared
        result.events = self.events
        result.unlearned = self.unlearned
        return result
