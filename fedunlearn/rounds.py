"""The server's round loop, independent of how messages reach the clients.

Every engine supplies a `ClientPool`; the loop (sampling, aggregation, evaluation schedule) is this
one function, so the Flower path and the in-process runner cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedunlearn.config import Config
from fedunlearn.federated import ClientEvaluation, ClientUpdate, aggregate
from fedunlearn.metrics import ranking_metrics
from fedunlearn.models import Arrays, SplitModel, build_model
from fedunlearn.progress import Progress
from fedunlearn.seeding import Stream, client_uniforms, rng_for

ProgressHook = Callable[[int], None]


class ClientPool(Protocol):
    """Runs the client steps on the chosen clients (by federation index) and returns their replies."""

    def train(
        self, round_number: int, clients: list[int], shared: Arrays, done: ProgressHook
    ) -> list[ClientUpdate]: ...

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[ClientEvaluation]: ...


@dataclass
class FederationResult:
    rounds: list[dict[str, float]] = field(default_factory=list)  # one row per evaluated round
    final: dict[str, float] = field(default_factory=dict)
    shared: Arrays = field(default_factory=dict)
    round_ends: list[float] = field(default_factory=list)  # wall-clock time.time() at the end of each round


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
    return metrics


def select_final(rows: list[dict[str, float]], select: str) -> dict[str, float]:
    """The reported row: the last evaluated round, or the one with the best validation HR@10
    (earliest on ties), so the test item never chooses the model it is judged on."""
    if select == "last":
        return dict(rows[-1])
    return dict(max(rows, key=lambda row: row["valid_HR@10"]))


def run_federation(
    config: Config, client_ids: list[str], n_items: int, pool: ClientPool, progress: Progress
) -> FederationResult:
    model: SplitModel = build_model(config.model, n_items)
    seed = config.run.seed
    shared = model.init_shared(rng_for(seed, Stream.SHARED_INIT))
    result = FederationResult()
    everyone = list(range(len(client_ids)))
    started = time.perf_counter()
    rounds = config.train.rounds
    for round_number in range(1, rounds + 1):
        clients = sample_clients(seed, round_number, client_ids, config.train.fraction)
        progress.start_round(round_number, len(clients))
        # replies arrive in any order: sort by client id so every sum runs in the same order
        updates = sorted(pool.train(round_number, clients, shared, progress.client_done), key=_by_client)
        shared = aggregate(model, shared, updates, config.train.server_lr)
        if round_number % config.eval.every == 0 or round_number == rounds:
            evaluations = sorted(pool.evaluate(everyone, shared, lambda _: None), key=_by_client)
            row = {
                "round": round_number,
                "clients": len(clients),
                "train_loss": float(np.mean([u.loss for u in updates])),
                **evaluation_metrics(evaluations, config.eval.ks, config.eval.full_ranking),
                "seconds": time.perf_counter() - started,
            }
            result.rounds.append(row)
            progress.evaluated(row)
        result.round_ends.append(time.time())
        progress.end_round()
    result.final = select_final(result.rounds, config.eval.select)
    result.shared = shared
    return result
