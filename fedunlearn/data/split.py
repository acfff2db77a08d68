"""Leave-one-out split: each user's latest interaction is the test item, the one before it validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedunlearn.data.dataset import Dataset
from fedunlearn.errors import FedUnlearnError

_CHUNK_CELLS = 1 << 21  # users x draws per rejection round, bounding memory
_ROUNDS = 3  # vectorized rejection rounds before the exact per-user fallback
_MIN_FREE = 0.25  # users with a smaller share of unseen items are sampled exactly (rejection would draw too much)


@dataclass(frozen=True)
class Split:
    n_users: int
    n_items: int
    train_indptr: np.ndarray  # (U+1,) CSR over users
    train_items: np.ndarray  # (nnz,) int64 training positives, sorted and unique per user
    valid_item: np.ndarray  # (U,) int64: second-latest interaction
    test_item: np.ndarray  # (U,) int64: latest interaction
    test_negatives: np.ndarray  # (U, num_negatives) int64: distinct items the user never interacted with

    def train_of(self, u: int) -> np.ndarray:
        return self.train_items[self.train_indptr[u] : self.train_indptr[u + 1]]

    def pairs_of(self, users: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The (user, item) training pairs of these users, in the split's order."""
        owners = np.repeat(np.arange(self.n_users), np.diff(self.train_indptr))
        kept = np.zeros(self.n_users, dtype=bool)
        kept[users] = True
        return owners[kept[owners]], self.train_items[kept[owners]]

    def positives_of(self, u: int) -> np.ndarray:
        """Every item of the user (train, validation, test), sorted."""
        return np.union1d(self.train_of(u), [self.valid_item[u], self.test_item[u]])


def leave_one_out(ds: Dataset, num_negatives: int = 99, seed: int = 0) -> Split:
    """Split by timestamp (ties: source row order) and sample test negatives with a seeded generator."""
    n_users, n_items = ds.n_users, ds.n_items
    counts = np.bincount(ds.users, minlength=n_users)
    if n_users and counts.min() < 3:
        u = int(np.argmin(counts))
        raise FedUnlearnError(
            f"user {ds.user_ids[u]} has {counts[u]} interaction(s) but leave-one-out needs 3: "
            "drop such users first (drop_users_with_fewer_than(ds, 3))"
        )
    by_time = np.argsort(ds.timestamps, kind="stable")
    order = by_time[np.argsort(ds.users[by_time], kind="stable")]
    ends = np.cumsum(counts)
    test_item = ds.items[order[ends - 1]]
    valid_item = ds.items[order[ends - 2]]

    users = np.arange(n_users, dtype=np.int64)
    held_out = np.concatenate([users * n_items + valid_item, users * n_items + test_item])
    all_keys = _sorted_unique(ds.users * n_items + ds.items)
    train_keys = all_keys[~np.isin(all_keys, held_out)]
    train_users = train_keys // n_items
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(train_users, minlength=n_users), out=indptr[1:])

    positives_per_user = np.bincount(all_keys // n_items, minlength=n_users)
    available = n_items - positives_per_user
    if n_users and available.min() < num_negatives:
        u = int(np.argmin(available))
        raise FedUnlearnError(
            f"user {ds.user_ids[u]} has only {available[u]} items left to sample {num_negatives} test "
            f"negatives from: "
            + (f"lower data.test_negatives to at most {available[u]}" if available[u] > 0 else
               "this user has interacted with every item; give the data more items, or leave the user out")
        )  # fmt: skip
    rng = np.random.default_rng(seed)
    negatives = _sample_negatives(all_keys, positives_per_user, n_items, num_negatives, rng)
    return Split(
        n_users=n_users,
        n_items=n_items,
        train_indptr=indptr,
        train_items=(train_keys % n_items).astype(np.int64),
        valid_item=valid_item.astype(np.int64),
        test_item=test_item.astype(np.int64),
        test_negatives=negatives,
    )


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique without its hash-based path, which is several times slower on millions of int64 keys."""
    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def _sample_negatives(
    positive_keys: np.ndarray, positives_per_user: np.ndarray, n_items: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """k distinct non-positive items per user, uniformly at random.

    Draw items with replacement and keep the first k distinct non-positives of each row; rows
    that come up short are redrawn (a symmetric event, so accepted rows stay uniform). Users who
    saw most items, and the few rows still short after some rounds, are sampled exactly.
    """
    n_users = len(positives_per_user)
    out = np.empty((n_users, k), dtype=np.int64)
    if n_users == 0:
        return out
    free = (n_items - positives_per_user) / n_items
    exact = [np.flatnonzero(free < _MIN_FREE)]
    sparse = np.flatnonzero(free >= _MIN_FREE)
    step = max(1, _CHUNK_CELLS // _draws(k, _MIN_FREE))
    for start in range(0, len(sparse), step):
        todo = sparse[start : start + step]
        for _ in range(_ROUNDS):
            if len(todo) == 0:
                break
            todo = _draw(positive_keys, todo, n_items, k, _draws(k, free[todo].min()), rng, out)
        exact.append(todo)
    for u in np.concatenate(exact):
        lo, hi = np.searchsorted(positive_keys, [u * n_items, (u + 1) * n_items])
        unseen = np.setdiff1d(np.arange(n_items), positive_keys[lo:hi] % n_items)
        out[u] = rng.choice(unseen, size=k, replace=False)
    return out


def _draws(k: int, free: float) -> int:
    """Draws per row that almost always hold k distinct items when a share `free` of items qualifies."""
    return int(np.ceil(1.5 * k / free)) + 16


def _draw(
    positive_keys: np.ndarray,
    users: np.ndarray,
    n_items: int,
    k: int,
    draws: int,
    rng: np.random.Generator,
    out: np.ndarray,
) -> np.ndarray:
    """One rejection round: fill `out` for users that got k valid draws; return the others."""
    candidates = rng.integers(0, n_items, size=(len(users), draws))
    keys = users[:, None] * n_items + candidates
    found = np.searchsorted(positive_keys, keys).clip(max=len(positive_keys) - 1)
    valid = positive_keys[found] != keys
    # keep the first occurrence of each item in a row: stable sort by item, compare neighbours
    by_item = np.argsort(candidates, axis=1, kind="stable")
    sorted_items = np.take_along_axis(candidates, by_item, axis=1)
    repeat = np.zeros_like(valid)
    repeat[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    first = np.empty_like(valid)
    np.put_along_axis(first, by_item, ~repeat, axis=1)
    valid &= first
    ok = valid.sum(axis=1) >= k
    rows = np.flatnonzero(ok)
    take = valid[rows] & (np.cumsum(valid[rows], axis=1) <= k)
    out[users[rows]] = candidates[rows][take].reshape(len(rows), k)
    return users[~ok]
