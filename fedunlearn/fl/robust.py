"""Robust server steps (`train.aggregation`): a coordinate-wise median or trimmed mean, row-wise.

Flower's FedMedian and FedTrimmedAvg take every client's full parameter vector; here an item row
is aggregated over the clients that touched it only (as the mean rule does), so each row has its
own set of values. Per coordinate this is exactly `numpy.median` and `scipy.stats.trim_mean`
(`int(trim * n)` values cut at each end), the rules those strategies use; like them it ignores
example counts. Dense layers are aggregated over every upload.
"""

from __future__ import annotations

import numpy as np

from fedunlearn.fl.aggregation import aggregate_delta
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models.base import Arrays, SplitModel

CHUNK_VALUES = 2**24  # float64 values held at once (clients x rows x d)


def coordinatewise(values: np.ndarray, rule: str, trim: float) -> np.ndarray:
    """Median or trimmed mean along axis 0, skipping NaN (a client that did not touch the row)."""
    if rule == "median":
        return np.nanmedian(values, axis=0)
    counts = np.count_nonzero(~np.isnan(values), axis=0)
    ordered = np.sort(values, axis=0)  # NaN sort last
    running = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(np.nan_to_num(ordered), axis=0)])
    lower = (trim * counts).astype(int)
    upper = counts - lower
    total = np.take_along_axis(running, upper[None], 0)[0] - np.take_along_axis(running, lower[None], 0)[0]
    return total / np.maximum(upper - lower, 1)


def server_delta(
    model: SplitModel,
    shared: Arrays,
    updates: list[ClientUpdate],
    server_lr: float,
    rule: str,
    trim: float,
    dense_lr: float = 1.0,
) -> Arrays:
    """The server's step under `rule`: aggregation.aggregate_delta's weighted mean, or the robust one."""
    if rule == "mean" or not updates:
        return aggregate_delta(model, shared, updates, server_lr, dense_lr)
    delta = {key: np.zeros(value.shape, dtype=np.float64) for key, value in shared.items()}
    for key in model.row_keys:
        dim = shared[key].shape[1]
        touched = np.unique(np.concatenate([u.item_ids for u in updates]))
        step = max(1, CHUNK_VALUES // (len(updates) * dim))
        for start in range(0, len(touched), step):
            rows = touched[start : start + step]
            values = np.full((len(updates), len(rows), dim), np.nan)
            for c, update in enumerate(updates):
                inside = (update.item_ids >= rows[0]) & (update.item_ids <= rows[-1])
                values[c, np.searchsorted(rows, update.item_ids[inside])] = update.rows[key][inside]
            delta[key][rows] = server_lr * coordinatewise(values, rule, trim)
    for key in model.dense_keys(shared):
        stacked = np.stack([u.dense[key].astype(np.float64) for u in updates])
        delta[key] = dense_lr * coordinatewise(stacked, rule, trim)
    return delta
