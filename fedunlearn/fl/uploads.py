"""What the server sees of a client (its upload), and the client-side defences on it.

- `pad_pseudo_items`: the client also sends rows for items it never touched, with changes drawn
  to look like its real ones, so the set of sent rows no longer spells out its interactions:
  from one Gaussian fitted to the real rows, or (`mimic`) as jittered copies of real rows, so that
  the upload-structure attack's sign split (privacy.upload_attack) reads fake items as positives
  in the proportion real rows are.
- `privatize`: local differential privacy on the whole shared-parameter change, per upload: clip
  to norm C, then add Gaussian noise (L2) or Laplace noise (L1 clip). Local DP protects any two
  contributions of the client from each other, and two clipped uploads can lie 2C apart, so the
  sensitivity is 2C (not the add/remove C of central DP). Gaussian: the smallest sigma that is
  (epsilon, delta)-DP by the analytic calibration (`gaussian_sigma`; the classical
  C sqrt(2 ln(1.25 / delta)) / epsilon holds only for epsilon < 1, and gave epsilon 8 the privacy
  of about 19). Laplace: scale 2C / epsilon, epsilon-DP. It protects the values of the sent rows,
  not which rows are sent: combine it with pseudo-items for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from scipy.special import log_ndtr, ndtr

from fedunlearn.config import DefenceConfig
from fedunlearn.fl.updates import ClientUpdate


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The delta at which Gaussian noise sigma on an L2 sensitivity is epsilon-DP, exactly (Balle &
    Wang, ICML 2018, Theorem 8): Phi(D / 2s - e s / D) - exp(e) Phi(-D / 2s - e s / D)."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return float(ndtr(a - b) - np.exp(epsilon + log_ndtr(-a - b)))


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest sigma whose Gaussian noise is (epsilon, delta)-DP for this L2 sensitivity."""
    return _smallest_private(lambda sigma: gaussian_delta(sigma, sensitivity, epsilon) <= delta, sensitivity * 1e-6,
                             sensitivity)  # fmt: skip


def gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """The smallest epsilon at which Gaussian noise sigma is (epsilon, delta)-DP for this sensitivity."""
    return _smallest_private(lambda epsilon: gaussian_delta(sigma, sensitivity, epsilon) <= delta, 0.0, 1.0)


def run_epsilon(defence: DefenceConfig, uploads: int) -> float:
    """The epsilon of one client's `uploads` LDP uploads together (at defence.ldp_delta for the
    Gaussian mechanism). Gaussian releases of one sigma compose exactly into a single release of
    sensitivity sqrt(uploads) x 2C (the Gaussian privacy loss adds in quadrature: Dong, Roth & Su's
    Gaussian DP); Laplace ones add their epsilons (basic composition, an upper bound)."""
    if defence.ldp_mechanism == "gaussian":
        sigma = gaussian_sigma(2 * defence.ldp_clip, defence.ldp_epsilon, defence.ldp_delta)
        return gaussian_epsilon(sigma, np.sqrt(uploads) * 2 * defence.ldp_clip, defence.ldp_delta)
    return uploads * defence.ldp_epsilon


def _smallest_private(private: Callable[[float], bool], low: float, high: float) -> float:
    """The smallest value at which `private` holds, for a `private` that holds from some value on
    (the exact delta falls as sigma or epsilon grows): double `high` until it holds, then bisect."""
    while not private(high):
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if private(middle) else (middle, high)
    return high


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
        sigma = gaussian_sigma(2 * clip, epsilon, delta)  # two clipped uploads lie up to 2C apart
        noisy = {k: (v * factor + rng.normal(0, sigma, v.shape)).astype(v.dtype) for k, v in arrays.items()}
    else:
        scale = 2 * clip / epsilon
        noisy = {k: (v * factor + rng.laplace(0, scale, v.shape)).astype(v.dtype) for k, v in arrays.items()}
    return replace(
        update,
        rows={k: v for (part, k), v in noisy.items() if part == "rows"},
        dense={k: v for (part, k), v in noisy.items() if part == "dense"},
    )


def protect_upload(
    update: ClientUpdate, defence: DefenceConfig, n_items: int, rng: np.random.Generator
) -> ClientUpdate:
    """The configured upload defence: pseudo-items first (so noise covers the fake rows too), then LDP.
    Trained pseudo-items are already in the update (fl.client.plan_local_training)."""
    if "pseudo-items" in defence.upload and not defence.trains_fake_items():
        update = pad_pseudo_items(update, n_items, defence.pseudo_items, rng, defence.pseudo_rows)
    if "ldp" in defence.upload:
        update = privatize(update, defence.ldp_mechanism, defence.ldp_clip, defence.ldp_epsilon, defence.ldp_delta, rng)
    return update
