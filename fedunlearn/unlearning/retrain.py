"""Retrain: train from scratch without the leaving clients, same seed and schedule (ground truth)."""

from __future__ import annotations

from contextlib import nullcontext

from fedunlearn.config import Config
from fedunlearn.fl.secure_round import SECURE_UPLOAD
from fedunlearn.models.base import Arrays
from fedunlearn.seeding import Stream, rng_for
from fedunlearn.unlearning.context import UnlearningServer


def retrain(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    """Rounds 1 .. round_number-1 again from the initial parameters, every remaining client starting
    from a fresh user part; client draws are keyed by client id, so each round samples exactly the
    clients the original round sampled, less the forgotten ones (Retrain equals a run configured
    without them). The history is rewritten if a later event will read it.

    Under secure aggregation the replay takes training draws of its own (`retrain_seed`: initial
    parameters, user parts, negatives, minibatches and, with train.fraction < 1, the sampled
    clients): with the run's, every retained client's contribution to a replayed round repeats to
    the bit, and the server reads a removed client's upload as the original round's secure sum less
    the replay's. Retrain is then a run of another training seed without them (docs/PRIVACY.md)."""
    secure = server.config.defence.upload == SECURE_UPLOAD
    with server.training_draws(retrain_seed(server.config, round_number)) if secure else nullcontext():
        server.pool.forget(server.active)
        server.restart_server_optimizer()
        if server.history is not None and server.records_history():
            server.history.clear()
        shared = server.initial
        for past in range(1, round_number):
            shared, _ = server.train_round(past, server.sample(past), shared)
    return shared


def retrain_seed(config: Config, round_number: int) -> int:
    """The training seed of a Retrain under secure aggregation at the event before `round_number`: a
    pure function of the run's training seed and the event, never the run's own."""
    own = config.run.training_seed()
    drawn = int(rng_for(own, Stream.RETRAIN_DRAWS, round_number).integers(2**31 - 1))
    return drawn if drawn != own else drawn + 1
