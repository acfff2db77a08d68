"""The upload-structure attack: what a curious server reads from one client's upload alone.

A client's change of an item row follows the gradient of its loss, and for a dot-product model
that gradient is the user embedding: the rows of positives move along +u, those of sampled
negatives along -u (BPR and BCE alike). So the row changes of one upload are close to rank one:
their top right singular vector is +-u's direction, and the sign of each row's projection on it
splits positives from negatives. Each positive comes with `model.negatives` sampled negatives, so
the positives are the smaller side; the direction is oriented so that they project positively.
With `model.negatives = 1` the sides are about the same size and this rule may swap them (the
split stays right, the labels flip, and precision and cosine read low); the audit says so when it
runs such a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models.base import Arrays


def recover_from_upload(update: ClientUpdate, row_keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(the recovered direction of the user embedding (D,), unit length or zero; the item ids read
    as the client's positives). Row tables side by side, in `row_keys` order, as flatten_users
    puts the user parts (NCF: GMF then MLP)."""
    changes = np.concatenate([update.rows[key] for key in row_keys], axis=1).astype(np.float64)
    if len(changes) < 2 or not np.any(changes):
        return np.zeros(changes.shape[1]), np.zeros(0, dtype=np.int64)
    direction = np.linalg.svd(changes, full_matrices=False)[2][0]
    projection = changes @ direction
    if (projection > 0).sum() > (projection < 0).sum():  # the positives are the smaller side
        direction, projection = -direction, -projection
    return direction, np.asarray(update.item_ids)[projection > 0].astype(np.int64)


def upload_view(updates: list[ClientUpdate], positions: dict[str, int], n_clients: int, n_items: int,
                row_keys: tuple[str, ...]) -> Arrays:  # fmt: skip
    """What a curious server keeps of each client's last upload (rows of clients not sampled stay
    zero, and `uploaded` (clients,) says which hold one): `norms` (clients, items), the size of its
    change of each item row; `directions` (clients, D), the recovered embedding direction;
    `recovered` (clients, items), the items read as its positives."""
    dim = sum(updates[0].rows[key].shape[1] for key in row_keys) if updates else 0
    view = {
        "norms": np.zeros((n_clients, n_items), dtype=np.float32),
        "directions": np.zeros((n_clients, dim)),
        "recovered": np.zeros((n_clients, n_items), dtype=bool),
        "uploaded": np.zeros(n_clients, dtype=bool),
    }
    read: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # under secure aggregation every client's
    for update in updates:  # "upload" is the same round mean (fl.rounds.RoundSeen): read it once
        at = positions[update.client_id]
        view["uploaded"][at] = True
        for rows in update.rows.values():
            view["norms"][at, update.item_ids] += np.linalg.norm(rows, axis=1)
        if id(update.rows) not in read:
            read[id(update.rows)] = recover_from_upload(update, row_keys)
        view["directions"][at], recovered = read[id(update.rows)]
        view["recovered"][at, recovered] = True
    return view


def own_row_scores(update: ClientUpdate, row_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Two attackers on pseudo-items, each a score per sent row, higher for rows that look like the
    client's own (rows of positives and of their negatives alike): `residual`, minus a row's distance
    from the upload's rank-one fit over its norm (a fake row drawn from one Gaussian fitted to all
    rows is off the +-u line that trained rows lie on); `neighbour`, minus the squared distance to
    the nearest other row (a jittered copy of a real row lies next to it)."""
    rows = np.concatenate([update.rows[key] for key in row_keys], axis=1).astype(np.float64)
    direction = np.linalg.svd(rows, full_matrices=False)[2][0]
    squared = (rows**2).sum(1)
    off_line = np.linalg.norm(rows - np.outer(rows @ direction, direction), axis=1)
    distances = squared[:, None] + squared[None] - 2 * rows @ rows.T
    np.fill_diagonal(distances, np.inf)
    return {"residual": -off_line / np.maximum(np.sqrt(squared), 1e-30), "neighbour": -distances.min(1)}


@dataclass
class RecoveryScore:
    precision: float  # of the items read as positives, the share that are (mean over clients that read any)
    recall: float  # of the client's training positives, the share read (mean over clients)
    cosine: float  # between the recovered direction and the true user embedding (median over clients)
    clients: int  # clients with an upload in the view


def recovery_score(view: Arrays, positives: list[np.ndarray], users: np.ndarray) -> RecoveryScore:
    """How well the attack read each client (the simulation knows the truth): `view` as upload_view
    writes it, `positives` each client's training items, `users` the flattened user parts (same
    rows). Clients without an upload are left out (the audit's `tested` are the same clients), and
    from the precision those of whom nothing was read (its 0/0 is no precision); NaN where none is left."""
    recovered, directions = view["recovered"], view["directions"]
    sampled = np.flatnonzero(view["uploaded"])
    precision, recall, cosine = [], [], []
    for i in sampled:
        truth = np.zeros(recovered.shape[1], dtype=bool)
        truth[positives[i]] = True
        hits = np.count_nonzero(recovered[i] & truth)
        read = np.count_nonzero(recovered[i])
        precision.append(hits / read if read else np.nan)
        recall.append(hits / max(np.count_nonzero(truth), 1))
        cosine.append(directions[i] @ users[i] / max(np.linalg.norm(users[i]), 1e-12))
    if not len(sampled):
        return RecoveryScore(np.nan, np.nan, np.nan, 0)
    read_any = [p for p in precision if not np.isnan(p)]
    mean_precision = float(np.mean(read_any)) if read_any else np.nan
    return RecoveryScore(mean_precision, float(np.mean(recall)), float(np.median(cosine)), len(sampled))
