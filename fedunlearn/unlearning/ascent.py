"""Bounded gradient ascent (PGA, Halimi et al. 2022): before leaving, each client climbs its own
loss from the current model; its ascent step is projected onto a ball whose radius is the norm of
its own last stored update, so it can undo about one round of its influence and no more."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedunlearn.federated import ClientUpdate, aggregate, rescale_tensors
from fedunlearn.models import Arrays
from fedunlearn.unlearning.federaser import require_history

if TYPE_CHECKING:
    from fedunlearn.rounds import FederatedServer


def project(update: ClientUpdate, radius: dict[str, float]) -> ClientUpdate:
    """Scale each shared tensor of the update down (never up) to the radius given for it."""
    return rescale_tensors(update, radius, only_down=True)


def ascent(server: FederatedServer, round_number: int, forgotten: list[int]) -> Arrays:
    history = require_history(server, "ascent")
    steps = server.pool.train(round_number, forgotten, server.shared, server.progress.client_done, None, True)
    server.client_epochs += sum(u.epochs for u in steps)
    bounded = []
    for step in steps:
        last = max(r for r in history.rounds() if r < round_number and step.client_id in history.participants(r))
        bounded.append(project(step, history.norms(last, step.client_id)))
    return aggregate(server.model, server.shared, bounded, server.config.train.server_lr)
