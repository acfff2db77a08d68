"""Retrain: train from scratch without the leaving clients, same seed and schedule (ground truth)."""

from __future__ import annotations

from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer


def retrain(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    """Rounds 1 .. round_number-1 again from the initial parameters, every remaining client starting
    from a fresh user part; client draws are keyed by client id, so each round samples exactly the
    clients the original round sampled, less the forgotten ones. The history is rewritten if a later
    event will read it."""
    server.pool.forget(server.active)
    server.restart_server_optimizer()
    if server.history is not None and server.records_history():
        server.history.clear()
    shared = server.initial
    for past in range(1, round_number):
        shared, _ = server.train_round(past, server.sample(past), shared)
    return shared
