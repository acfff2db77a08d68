"""FedAccum: replay the retained clients' stored checkpoint updates, without calibration."""

from __future__ import annotations

from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer, require_history


def accum(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    """From the first checkpoint, add up the retained clients' stored updates of every checkpoint
    round. If a later event will read the history, each checkpoint is replaced by the model the
    replay reached there, so no stored model keeps the leaving clients (the first holds no one's)."""
    history = require_history(server, "accum")
    checkpoints = [c for c in history.checkpoint_rounds() if c < round_number]
    retained = {server.client_ids[i] for i in server.active}
    shared = history.checkpoint(checkpoints[0])
    server.roll_back_users()
    rewrite = server.records_history()
    for checkpoint in checkpoints:
        if rewrite:
            history.put_checkpoint(checkpoint, shared)
        updates = history.updates(checkpoint, [c for c in history.participants(checkpoint) if c in retained])
        shared = server.aggregate(shared, updates)
    return shared
