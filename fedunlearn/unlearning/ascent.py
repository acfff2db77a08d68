"""Bounded gradient ascent (PGA, Halimi et al. 2022): before leaving, each client climbs its own
loss from the current model; its ascent step is projected onto a ball whose radius is the step size
of its own last stored update (per changed row for item tables), so it can undo about one round of
its influence and no more."""

from __future__ import annotations

from fedunlearn.fl.updates import ClientUpdate, rescale_tensors
from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer, require_history


def project(update: ClientUpdate, radius: dict[str, float]) -> ClientUpdate:
    """Scale each shared tensor of the update down (never up) to the step size given for it."""
    return rescale_tensors(update, radius, only_down=True, per_row=True)


def ascent(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    history = require_history(server, "ascent")
    last_round = {}  # each leaving client's last round; one that never trained left nothing to undo
    for past in history.rounds():
        if past < round_number:
            last_round |= {index: past for index in forgotten if server.client_ids[index] in history.participants(past)}
    climbing = [index for index in forgotten if index in last_round]
    steps = server.train_clients(round_number, climbing, server.shared, None, ascent=True)
    bounded = [
        project(step, history.sizes(last_round[server.position[step.client_id]], step.client_id)) for step in steps
    ]
    return server.aggregate(server.shared, bounded)
