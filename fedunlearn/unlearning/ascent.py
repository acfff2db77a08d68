"""Bounded gradient ascent (PGA, Halimi et al. 2022): before leaving, each client climbs its own
loss from the current model; its ascent step is projected onto a ball whose radius is the norm of
its own last stored update, so it can undo about one round of its influence and no more."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedunlearn.federated import ClientUpdate, aggregate
from fedunlearn.models import Arrays
from fedunlearn.unlearning.federaser import require_history

if TYPE_CHECKING:
    from fedunlearn.rounds import FederatedServer


def project(update: ClientUpdate, radius: dict[str, float]) -> ClientUpdate:
    """Scale each shared tensor of the update down (never up) to the radius given for it."""

    def bounded(key: str, value: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(value))
        return (value * (radius[key] / norm)).astype(np.float32) if norm > radius[key] else value

    return ClientUpdate(
        update.client_id,
        update.num_examples,
        update.item_ids,
        {key: bounded(key, value) for key, value in update.rows.items()},
        {key: bounded(key, value) for key, value in update.dense.items()},
        update.loss,
        update.epochs,
    )


def ascent(server: FederatedServer, round_number: int, forgotten: list[int]) -> Arrays:
    history = require_history(server, "ascent")
    steps = server.pool.train(round_number, forgotten, server.shared, server.progress.client_done, None, True)
    server.client_epochs += sum(u.epochs for u in steps)
    bounded = []
    for step in steps:
        last = max(r for r in history.rounds() if r < round_number and step.client_id in history.participants(r))
        bounded.append(project(step, history.norms(last, step.client_id)))
    return aggregate(server.model, server.shared, bounded, server.config.train.server_lr)
