"""The built-in dataset: users whose demographic attributes shape what they interact with.

Each attribute value has a latent vector; a user's taste is Gaussian noise plus `strength` times
the sum of their attribute vectors, so behaviour leaks attributes in proportion to `strength`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedunlearn.data.dataset import Dataset
from fedunlearn.errors import FedUnlearnError

GENDERS = {"M": 0.7, "F": 0.3}
# ML-1M age-group shares
AGE_GROUPS = {
    "<18": 0.037,
    "18-24": 0.183,
    "25-34": 0.347,
    "35-44": 0.198,
    "45-49": 0.091,
    "50-55": 0.082,
    "56+": 0.063,
}
# ML-100K occupation counts (943 users)
OCCUPATIONS = {
    "student": 196,
    "other": 105,
    "educator": 95,
    "administrator": 79,
    "engineer": 67,
    "programmer": 66,
    "librarian": 51,
    "writer": 45,
    "executive": 32,
    "scientist": 31,
    "artist": 28,
    "technician": 27,
    "marketing": 26,
    "entertainment": 18,
    "healthcare": 16,
    "retired": 14,
    "lawyer": 12,
    "salesman": 12,
    "none": 9,
    "homemaker": 7,
    "doctor": 7,
}
ATTRIBUTES = {"gender": GENDERS, "age": AGE_GROUPS, "occupation": OCCUPATIONS}

_CHUNK_CELLS = 1 << 22  # users x items scored at once, bounding memory (depends on n_items only: deterministic)
_AFFINITY_SCALE = 2.0  # sharpness of taste relative to popularity
_ZIPF_EXPONENT = 0.8
_SIGMA = 0.5  # lognormal spread of interactions per user
_START = 1_577_836_800  # 2020-01-01 UTC
_YEAR = 365 * 86_400
_MEAN_GAP = 86_400  # mean seconds between a user's interactions
_RATING_CENTRE = 3.55  # stars at a user's average affinity (MovieLens averages about 3.5)


def generate(
    n_users: int = 600,
    n_items: int = 400,
    interactions_per_user: int = 40,
    strength: float = 1.0,
    seed: int = 0,
    dim: int = 16,
) -> Dataset:
    """A deterministic (per seed) synthetic dataset; ids are 0..n-1 (items nobody picked are left out)."""
    _validate(n_users, n_items, interactions_per_user, strength, dim)
    rng = np.random.default_rng(seed)

    codes = {name: rng.choice(len(values), size=n_users, p=_shares(values)) for name, values in ATTRIBUTES.items()}
    value_vectors = {name: rng.standard_normal((len(values), dim)) for name, values in ATTRIBUTES.items()}
    item_vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    ranks = rng.permutation(n_items) + 1
    log_popularity = (-_ZIPF_EXPONENT * np.log(ranks)).astype(np.float32)

    mu = np.log(interactions_per_user) - _SIGMA**2 / 2
    counts = np.rint(rng.lognormal(mu, _SIGMA, size=n_users)).astype(np.int64)
    counts = counts.clip(5, n_items // 2)

    users, items, ratings, timestamps = [], [], [], []
    chunk_users = max(1, _CHUNK_CELLS // n_items)
    for start in range(0, n_users, chunk_users):
        chunk = np.arange(start, min(start + chunk_users, n_users))
        taste = rng.standard_normal((len(chunk), dim))
        for name, vectors in value_vectors.items():
            taste += strength * vectors[codes[name][chunk]]
        affinity = (taste.astype(np.float32) @ item_vectors.T) / np.float32(np.sqrt(dim))
        chosen = _sample_without_replacement(_AFFINITY_SCALE * affinity + log_popularity, counts[chunk], rng)
        rows, cols = np.nonzero(chosen >= 0)  # row-major: each user's picks in time order
        picked = chosen[rows, cols]
        users.append(chunk[rows])
        items.append(picked)
        ratings.append(_ratings(affinity[rows, picked].astype(np.float64), rows, rng))
        timestamps.append(_timestamps(counts[chunk], rng))

    attributes = pd.DataFrame(
        {name: np.asarray(list(values), dtype=object)[codes[name]] for name, values in ATTRIBUTES.items()}
    )
    return _dataset(
        np.concatenate(users),
        np.concatenate(items),
        np.concatenate(ratings),
        np.concatenate(timestamps),
        n_users,
        n_items,
        attributes,
    )


def _validate(n_users: int, n_items: int, interactions_per_user: int, strength: float, dim: int) -> None:
    if n_users < 1 or dim < 1:
        raise FedUnlearnError("synthetic data needs at least 1 user and dim >= 1: raise data.synthetic_users")
    if n_items < 10:
        raise FedUnlearnError(f"synthetic data needs at least 10 items, got {n_items}: raise data.synthetic_items")
    if not 3 <= interactions_per_user <= n_items // 2:
        raise FedUnlearnError(
            f"data.synthetic_interactions is {interactions_per_user} but must be between 3 and half of "
            f"data.synthetic_items ({n_items // 2}): change one of them"
        )
    if strength < 0:
        raise FedUnlearnError(f"data.synthetic_strength is {strength} but must be >= 0 (0 = no attribute signal)")


def _shares(values: dict[str, float]) -> np.ndarray:
    weights = np.asarray(list(values.values()), dtype=float)
    return weights / weights.sum()


def _sample_without_replacement(logits: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, counts[row] distinct columns drawn with probability ∝ exp(logit) (Gumbel top-k).

    Returns (rows, max count) item indices in random order, padded with -1 after each row's picks.
    """
    # -(logit + Gumbel noise) = log(E) - logit with E ~ Exp(1), computed in place to save memory
    key = rng.standard_exponential(size=logits.shape, dtype=np.float32)
    with np.errstate(divide="ignore"):
        np.log(key, out=key)
    key -= logits
    k = int(counts.max())
    top = np.argpartition(key, k - 1, axis=1)[:, :k]
    ranked = np.take_along_axis(top, np.argsort(np.take_along_axis(key, top, axis=1), axis=1), axis=1)
    ranked[np.arange(k)[None, :] >= counts[:, None]] = -1
    # the time order of a user's picks must not follow preference: shuffle within the row
    shuffle = np.argsort(np.where(ranked >= 0, rng.random(ranked.shape), 2.0), axis=1)
    return np.take_along_axis(ranked, shuffle, axis=1)


def _ratings(affinity: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1..5 stars from the affinity of each pick standardized among the user's picks (about MovieLens' spread)."""
    counts = np.bincount(rows)
    mean = np.bincount(rows, weights=affinity) / counts
    std = np.sqrt(np.maximum(np.bincount(rows, weights=affinity**2) / counts - mean**2, 1e-12))
    z = (affinity - mean[rows]) / std[rows]
    noisy = _RATING_CENTRE + z + 0.6 * rng.standard_normal(len(rows))
    return np.clip(np.rint(noisy), 1, 5).astype(np.float32)


def _timestamps(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strictly increasing per user: a random start in 2020 plus exponential gaps of >= 1 s."""
    starts = _START + rng.integers(0, _YEAR, size=len(counts))
    gaps = 1 + rng.exponential(_MEAN_GAP, size=int(counts.sum())).astype(np.int64)
    offsets = np.cumsum(gaps)
    first = np.cumsum(counts) - counts  # index of each user's first pick
    return np.repeat(starts, counts) + offsets - np.repeat(offsets[first] - gaps[first], counts)


def _dataset(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    timestamps: np.ndarray,
    n_users: int,
    n_items: int,
    attributes: pd.DataFrame,
) -> Dataset:
    """Pairs are distinct by construction; items nobody picked are dropped and the rest re-indexed."""
    picked = np.bincount(items, minlength=n_items) > 0
    new_index = np.cumsum(picked) - 1
    return Dataset(
        name="synthetic",
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=np.flatnonzero(picked).astype(np.int64),
        users=users.astype(np.int64),
        items=new_index[items].astype(np.int64),
        ratings=ratings,
        timestamps=timestamps.astype(np.int64),
        attributes=attributes,
    )
