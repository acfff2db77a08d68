"""What a round's clients send back (updates, evaluations) and how big a step an update is.

Value types shared by the client step, aggregation, upload protection, history and unlearning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fedunlearn.models.base import Arrays


@dataclass
class ClientUpdate:
    """What a client sends to the server after training; never its user part."""

    client_id: str
    num_examples: int
    item_ids: np.ndarray  # (k,) rows touched, sorted
    rows: Arrays  # row table name -> (k, d) change of those rows
    dense: Arrays  # dense array name -> change
    loss: float
    epochs: float = 0.0  # epochs actually trained: examples used / examples in one epoch
    steps: int = 0  # optimizer steps (minibatches) taken


@dataclass
class ClientEvaluation:
    client_id: str
    rank: int  # of the test item among the sampled negatives
    valid_rank: int  # of the validation item among the same negatives (for model selection)
    full_rank: int  # of the test item among every item the user has not seen (-1 when not asked for)
    target_rank: int = -1  # of the promoted item among the user's other unseen items (-1: no target)


def step_size(value: np.ndarray, per_row: bool) -> float:
    """How far an update moves one shared tensor. For an item table (`per_row`) the root mean square
    of the changed rows' norms: under Adam every touched row moves about lr * sqrt(d) per step, so a
    table's plain norm mostly counts the rows touched, and a shorter training touches fewer rows
    (docs/ARCHITECTURE.md, calibration). For a dense layer its norm."""
    norm = float(np.linalg.norm(value))
    return norm / math.sqrt(len(value)) if per_row and len(value) else norm


def step_sizes(update: ClientUpdate) -> dict[str, float]:
    """step_size of each shared tensor of the update (item tables per row)."""
    return {key: step_size(value, True) for key, value in update.rows.items()} | {
        key: step_size(value, False) for key, value in update.dense.items()
    }


def rescale_tensors(
    update: ClientUpdate, targets: dict[str, float], only_down: bool = False, per_row: bool = False
) -> ClientUpdate:
    """The update with each shared tensor rescaled to the size given for it: its norm, or with
    `per_row` its step_size (item tables per row). With `only_down`, tensors already within it are
    left alone; a zero tensor stays zero."""

    def rescaled(key: str, value: np.ndarray, rows: bool) -> np.ndarray:
        size = step_size(value, rows and per_row)
        if size == 0 or (only_down and size <= targets[key]):
            return value
        return (value * (targets[key] / size)).astype(np.float32)

    return replace(
        update,
        rows={key: rescaled(key, value, True) for key, value in update.rows.items()},
        dense={key: rescaled(key, value, False) for key, value in update.dense.items()},
    )
