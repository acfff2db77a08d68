"""The in-memory dataset every loader produces: interactions on contiguous internal indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

UNKNOWN = "unknown"  # attribute value of a user the source says nothing about


@dataclass(frozen=True)
class Dataset:
    name: str
    user_ids: np.ndarray  # (U,) original ids, sorted; position = internal user index
    item_ids: np.ndarray  # (I,) original ids, sorted; position = internal item index
    users: np.ndarray  # (N,) int64 internal user index per interaction
    items: np.ndarray  # (N,) int64 internal item index per interaction
    ratings: np.ndarray  # (N,) float32
    timestamps: np.ndarray  # (N,) int64
    attributes: pd.DataFrame  # index 0..U-1; one string column per attribute (maybe none)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.users)


def normalize_ids(values: np.ndarray) -> np.ndarray:
    """int64 ids when every id is an integer written canonically ("7", not "007"), else strings.

    The canonical check keeps distinct source ids distinct after conversion.
    """
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    strings = values.astype(str)
    try:
        ints = strings.astype(np.int64)
    except (ValueError, OverflowError):
        return strings.astype(object)
    if np.array_equal(ints.astype(str), strings):
        return ints
    return strings.astype(object)


class BadNumber(ValueError):
    """A text value that is not a finite number of the wanted type; `row` is its position."""

    def __init__(self, row: int, value: str) -> None:
        super().__init__(f"row {row}: {value!r}")
        self.row = row
        self.value = value


def parse_numbers(values: np.ndarray, dtype: type) -> np.ndarray:
    """Strings to finite numbers of `dtype`, or BadNumber for the first value that is not one."""
    try:
        numbers = values.astype(dtype)
        if np.all(np.isfinite(numbers)):
            return numbers
    except (ValueError, OverflowError):
        pass
    converted = []
    for row, value in enumerate(values.tolist()):
        try:
            number = dtype(value)
            finite = bool(np.isfinite(number))
        except (ValueError, OverflowError):
            finite = False
        if not finite:
            raise BadNumber(row, value)
        converted.append(number)
    return np.asarray(converted, dtype=dtype)


def from_frame(name: str, frame: pd.DataFrame, attributes: pd.DataFrame) -> Dataset:
    """Build a Dataset from columns user, item, rating, timestamp and attributes indexed by user id.

    A repeated (user, item) pair keeps its latest interaction (by timestamp, then row order).
    Users absent from `attributes` get "unknown"; attribute rows of users without
    interactions are ignored.
    """
    users = normalize_ids(frame["user"].to_numpy())
    items = normalize_ids(frame["item"].to_numpy())
    timestamps = frame["timestamp"].to_numpy(dtype=np.int64)
    ratings = frame["rating"].to_numpy(dtype=np.float32)

    user_ids, user_index = np.unique(users, return_inverse=True)
    item_ids, item_index = np.unique(items, return_inverse=True)
    keep = _latest_per_pair(user_index, item_index, timestamps, len(item_ids))

    by_id = attributes.copy()
    by_id.index = by_id.index.map(str)
    table = by_id.reindex([str(uid) for uid in user_ids]).fillna(UNKNOWN).astype(str)
    table.index = pd.RangeIndex(len(user_ids))

    return Dataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        users=user_index[keep].astype(np.int64),
        items=item_index[keep].astype(np.int64),
        ratings=ratings[keep],
        timestamps=timestamps[keep],
        attributes=table,
    )


def _latest_per_pair(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int) -> np.ndarray:
    """Row positions (in source order) of the latest interaction of each (user, item) pair."""
    by_time = np.argsort(timestamps, kind="stable")
    keys = users[by_time].astype(np.int64) * n_items + items[by_time]
    # within each key the last row in time order wins: scan the reversed order for first occurrences
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return np.sort(by_time[len(keys) - 1 - first_in_reversed])


def subset(ds: Dataset, mask: np.ndarray) -> Dataset:
    """The interactions selected by `mask`, re-indexed to the users and items that still occur."""
    users, items = ds.users[mask], ds.items[mask]
    kept_users, new_users = np.unique(users, return_inverse=True)
    kept_items, new_items = np.unique(items, return_inverse=True)
    attributes = ds.attributes.iloc[kept_users].reset_index(drop=True)
    return Dataset(
        name=ds.name,
        user_ids=ds.user_ids[kept_users],
        item_ids=ds.item_ids[kept_items],
        users=new_users.astype(np.int64),
        items=new_items.astype(np.int64),
        ratings=ds.ratings[mask],
        timestamps=ds.timestamps[mask],
        attributes=attributes,
    )


def keep_ratings_at_least(ds: Dataset, min_rating: float) -> Dataset:
    """Implicit feedback: keep interactions rated >= min_rating (min_rating <= 0 keeps all)."""
    if min_rating <= 0:
        return ds
    return subset(ds, ds.ratings >= min_rating)


def drop_users_with_fewer_than(ds: Dataset, k: int) -> tuple[Dataset, int]:
    """Drop users with fewer than k interactions; returns the re-indexed dataset and how many went."""
    counts = np.bincount(ds.users, minlength=ds.n_users)
    dropped = int(np.count_nonzero(counts < k))
    if dropped == 0:
        return ds, 0
    return subset(ds, counts[ds.users] >= k), dropped


def describe(ds: Dataset) -> str:
    """Human-readable summary for `fedunlearn data info`."""
    counts = np.bincount(ds.users, minlength=ds.n_users)
    cells = ds.n_users * ds.n_items
    density = 100.0 * ds.n_interactions / cells if cells else 0.0
    lines = [
        f"dataset: {ds.name}",
        f"users: {ds.n_users:,}",
        f"items: {ds.n_items:,}",
        f"interactions: {ds.n_interactions:,}",
        f"density: {density:.2f}%",
    ]
    if ds.n_users:
        lines.append(f"interactions per user: min {counts.min()}, median {np.median(counts):g}, max {counts.max()}")
    for column in ds.attributes.columns:
        values = ds.attributes[column].value_counts()
        ordered = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
        width = max(len(str(value)) for value, _ in ordered)
        lines.append(f"{column} ({len(ordered)} values):")
        for value, count in ordered:
            lines.append(f"  {value:<{width}}  {count:>7,}  {100.0 * count / ds.n_users:5.1f}%")
    return "\n".join(lines)
