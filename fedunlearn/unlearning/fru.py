"""FRU (Yuan et al., WSDM 2023): roll back, then replay the rounds without the leaving clients with
short local training, each round's aggregate rescaled to the norm of the stored (compact) one."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fedunlearn.federated import ClientUpdate, apply_delta
from fedunlearn.history import COMPACT
from fedunlearn.models import Arrays
from fedunlearn.unlearning.federaser import require_history

if TYPE_CHECKING:
    from fedunlearn.rounds import FederatedServer


def fru(server: FederatedServer, round_number: int, forgotten: list[int]) -> Arrays:
    """Roll back to the latest checkpoint at or before the first round any leaving client took part
    in (checkpoints are kept every `unlearn.dt` rounds from round 1), then replay every later round
    with its participants less the leaving clients, each training `lam * E` epochs from the replayed
    model (their user parts take these new updates directly). Each replayed aggregate is rescaled,
    per shared tensor, to the norm of the aggregate of the same clients' stored compact updates (a
    row-wise mean over the clients that kept each row, which overstates the applied step; see
    docs/ARCHITECTURE.md). The history is rewritten with the replay (checkpoints, and each client's
    update scaled as its aggregate was), so a later removal rolls back to a model without them."""
    history = require_history(server, "fru")
    leaving = {server.client_ids[i] for i in forgotten}
    retained = {server.client_ids[i] for i in server.active}
    past = [r for r in history.rounds() if r < round_number]
    joined = [r for r in past if leaving & set(history.participants(r))]
    if not joined:
        return server.shared  # they never contributed: nothing to erase
    start = max(c for c in history.checkpoint_rounds() if c <= joined[0])
    shared = history.checkpoint(start)
    epochs = server.config.unlearn.lam * server.config.train.local_epochs
    for replayed in (r for r in past if r >= start):
        if replayed in history.checkpoint_rounds():
            history.put_checkpoint(replayed, shared)
        participants = [c for c in history.participants(replayed) if c in retained]
        if not participants:
            continue
        positions = [server.position[c] for c in participants]
        fresh = server.train_clients(replayed, positions, shared, epochs)
        stored = [history.update(replayed, c, COMPACT) for c in participants]
        new_step, reference = server.aggregate_delta(shared, fresh), server.aggregate_delta(shared, stored)
        scale = {key: _scale(new_step[key], reference[key]) for key in new_step}
        shared = apply_delta(shared, {key: new_step[key] * scale[key] for key in new_step})
        for update in fresh:
            history.replace_round_update(replayed, scaled(update, scale))
    return shared


def scaled(update: ClientUpdate, scale: dict[str, float]) -> ClientUpdate:
    """The update with each shared tensor multiplied by the factor its aggregate was given."""
    return replace(
        update,
        rows={key: (value * scale[key]).astype(np.float32) for key, value in update.rows.items()},
        dense={key: (value * scale[key]).astype(np.float32) for key, value in update.dense.items()},
    )


def _scale(direction: np.ndarray, reference: np.ndarray) -> float:
    norm = np.linalg.norm(direction)
    return float(np.linalg.norm(reference) / norm) if norm > 0 else 1.0
