"""What the server sees of a client (its upload), and the client-side defences on it.

- `pad_pseudo_items`: the client also sends rows for items it never touched, with changes drawn
  to look like its real ones, so the set of sent rows no longer spells out its interactions:
  from one Gaussian fitted to the real rows, or (`mimic`) as jittered copies of real rows, so that
  the upload-structure attack's sign split (privacy.upload_attack) reads fake items as positives
  in the proportion real rows are.
- `privatize`: local differential privacy on the whole shared-parameter change: clip to norm C,
  add Gaussian noise (sigma = C sqrt(2 ln(1.25 / delta)) / epsilon: (epsilon, delta)-DP per upload
  for a client's whole contribution, add/remove sensitivity C, L2) or Laplace noise (L1 clip,
  scale C / epsilon: epsilon-DP). It protects the values of the sent rows, not which rows are sent:
  combine it with pseudo-items for that.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedunlearn.config import DefenceConfig
from fedunlearn.fl.updates import ClientUpdate


def pad_pseudo_items(
    update: ClientUpdate, n_items: int, ratio: float, rng: np.random.Generator, rows_like: str = "gaussian"
) -> ClientUpdate:
    """Add round(ratio * rows sent) untouched items. `gaussian`: each row change drawn from a
    Gaussian with the per-coordinate mean and spread of the client's real row changes (unimodal,
    while the real rows are +u and -u: the sign split sets most fakes among the negatives).
    `mimic`: each fake row is a randomly chosen real row (the same one in every table) plus noise
    of a tenth of the real rows' per-coordinate spread, so positives and negatives are imitated in
    their real proportion."""
    untouched = np.setdiff1d(np.arange(n_items), update.item_ids)
    count = min(len(untouched), round(ratio * len(update.item_ids)))
    if count == 0:
        return update
    fake = np.sort(rng.choice(untouched, count, replace=False))
    items = np.concatenate([update.item_ids, fake])
    order = np.argsort(items)
    rows = {}
    source = rng.integers(0, len(update.item_ids), size=count) if rows_like == "mimic" else None
    for key, real in update.rows.items():
        spread = real.std(0) + 1e-12
        if source is None:
            drawn = rng.normal(real.mean(0), spread, size=(count, real.shape[1]))
        else:
            drawn = real[source] + rng.normal(0.0, 0.1 * spread, size=(count, real.shape[1]))
        rows[key] = np.concatenate([real, drawn.astype(real.dtype)])[order]
    return replace(update, item_ids=items[order], rows=rows)


def privatize(
    update: ClientUpdate, mechanism: str, clip: float, epsilon: float, delta: float, rng: np.random.Generator
) -> ClientUpdate:
    arrays = {**{("rows", k): v for k, v in update.rows.items()}, **{("dense", k): v for k, v in update.dense.items()}}
    order = 2 if mechanism == "gaussian" else 1
    norm = float(np.linalg.norm(np.concatenate([v.ravel() for v in arrays.values()]), ord=order))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    if mechanism == "gaussian":
        sigma = clip * np.sqrt(2 * np.log(1.25 / delta)) / epsilon
        noisy = {k: (v * factor + rng.normal(0, sigma, v.shape)).astype(v.dtype) for k, v in arrays.items()}
    else:
        scale = clip / epsilon
        noisy = {k: (v * factor + rng.laplace(0, scale, v.shape)).astype(v.dtype) for k, v in arrays.items()}
    return replace(
        update,
        rows={k: v for (part, k), v in noisy.items() if part == "rows"},
        dense={k: v for (part, k), v in noisy.items() if part == "dense"},
    )


def protect_upload(
    update: ClientUpdate, defence: DefenceConfig, n_items: int, rng: np.random.Generator
) -> ClientUpdate:
    """The configured upload defence: pseudo-items first (so noise covers the fake rows too), then LDP."""
    if "pseudo-items" in defence.upload:
        update = pad_pseudo_items(update, n_items, defence.pseudo_items, rng, defence.pseudo_rows)
    if "ldp" in defence.upload:
        update = privatize(update, defence.ldp_mechanism, defence.ldp_clip, defence.ldp_epsilon, defence.ldp_delta, rng)
    return update
