"""FedEraser (Liu et al., IWQoS 2021): calibrated replay of the stored checkpoint updates."""

from __future__ import annotations

from fedunlearn.fl.updates import ClientUpdate, rescale_tensors
from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer, require_history


def calibrate(update: ClientUpdate, stored_sizes: dict[str, float]) -> ClientUpdate:
    """Direction from the new training, step size from the history: per shared tensor, and for item
    tables per changed row (fl.updates.step_size), so a shorter calibration that touches fewer rows
    is not scaled up for the rows it did not touch."""
    return rescale_tensors(update, stored_sizes, per_row=True)


def federaser(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    """From the first checkpoint M(t1), apply the retained clients' stored updates of t1; at each
    later checkpoint tj the retained participants train r * E epochs from the calibrated model and
    their updates are rescaled to the step sizes stored for tj. If a later event will read the
    history, its checkpoints and updates are replaced by the calibrated ones, so that removal starts
    from a model without these clients."""
    history = require_history(server, "federaser")
    checkpoints = [c for c in history.checkpoint_rounds() if c < round_number]
    retained = {server.client_ids[i] for i in server.active}
    epochs = server.config.unlearn.r * server.config.train.local_epochs
    shared = history.checkpoint(checkpoints[0])
    server.roll_back_users()
    server.calibrations = []  # this event's only: an earlier event's hold clients that may have left since
    for j, checkpoint in enumerate(checkpoints):
        participants = [c for c in history.participants(checkpoint) if c in retained]
        rewrite = server.records_history()  # only a later event reads the calibrated history
        if rewrite:
            history.put_checkpoint(checkpoint, shared)
        if j == 0:
            updates = history.updates(checkpoint, participants)
        else:
            positions = [server.position[c] for c in participants]
            fresh = server.train_clients(checkpoint, positions, shared, epochs)
            stored = history.round_sizes(checkpoint)
            updates = [calibrate(u, stored[u.client_id]) for u in fresh]
            server.calibrations.extend((checkpoint, u) for u in updates)
            if rewrite:
                history.replace_updates(checkpoint, updates)
                history.drop_from_round(checkpoint, sorted(set(participants) - {u.client_id for u in updates}))
        shared = server.aggregate(shared, updates)
    return shared
