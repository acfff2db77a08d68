"""FRU (Yuan et al., WSDM 2023): roll back, then replay the rounds without the leaving clients with
short local training, each round's aggregate rescaled to the norm of the stored (compact) one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedunlearn.federated import apply_delta
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
    per shared tensor, to the norm of the aggregate of the same clients' stored compact updates."""
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
        participants = [c for c in history.participants(replayed) if c in retained]
        if not participants:
            continue
        positions = [server.position[c] for c in participants]
        fresh = server.train_clients(replayed, positions, shared, epochs)
        stored = [history.update(replayed, c, COMPACT) for c in participants]
        new_step, stored_step = server.aggregate_delta(shared, fresh), server.aggregate_delta(shared, stored)
        shared = apply_delta(shared, {key: _rescaled(new_step[key], stored_step[key]) for key in new_step})
    return shared


def _rescaled(direction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(direction)
    return direction * (np.linalg.norm(reference) / norm) if norm > 0 else direction
