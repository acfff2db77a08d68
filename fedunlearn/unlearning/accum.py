"""FedAccum: replay the retained clients' stored checkpoint updates, without calibration."""

from __future__ import annotations

from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer, require_history


def accum(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    history = require_history(server, "accum")
    checkpoints = [c for c in history.checkpoint_rounds() if c < round_number]
    retained = {server.client_ids[i] for i in server.active}
    shared = history.checkpoint(checkpoints[0])
    server.roll_back_users()
    for checkpoint in checkpoints:
        updates = history.updates(checkpoint, [c for c in history.participants(checkpoint) if c in retained])
        shared = server.aggregate(shared, updates)
    return shared
