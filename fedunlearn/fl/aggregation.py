"""The server's aggregation, over a round's client updates packed into concatenated arrays.

Packing (one array of ids, one of rows per table, dense layers stacked) lets the history store
and read a round in one piece, select clients from it and cut it to FRU's compact form without
unpacking it client by client; the aggregation reads the packed round through slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models.base import Arrays, SplitModel


@dataclass
class PackedUpdates:
    """Updates of one round, in client-id order: client i's rows are rows[key][offsets[i]:offsets[i+1]],
    its dense arrays dense[key][i], and the rows whose weight it counts in (every row it touched; a
    compact update keeps fewer) touched[touched_offsets[i]:touched_offsets[i+1]]."""

    clients: list[str]
    num_examples: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    touched_offsets: np.ndarray
    touched: np.ndarray
    rows: Arrays
    dense: Arrays

    @classmethod
    def pack(cls, updates: list[ClientUpdate], touched: list[np.ndarray] | None = None) -> PackedUpdates:
        """`touched[i]` defaults to the rows update i carries. Sorted by client id, so the sums of
        aggregation never depend on arrival order."""
        touched = [u.item_ids for u in updates] if touched is None else touched
        order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
        updates, touched = [updates[i] for i in order], [touched[i] for i in order]
        keys_rows = list(updates[0].rows) if updates else []
        keys_dense = list(updates[0].dense) if updates else []
        width = {key: updates[0].rows[key].shape[1] for key in keys_rows}
        return cls(
            [u.client_id for u in updates],
            np.array([u.num_examples for u in updates], dtype=np.int64),
            _offsets([len(u.item_ids) for u in updates]),
            np.concatenate([u.item_ids for u in updates] or [np.zeros(0)]).astype(np.int64),
            _offsets([len(t) for t in touched]),
            np.concatenate(touched or [np.zeros(0)]).astype(np.int64),
            {
                key: np.concatenate([u.rows[key] for u in updates] or [np.zeros((0, width[key]))]).astype(np.float32)
                for key in keys_rows
            },
            {key: np.stack([u.dense[key] for u in updates]).astype(np.float32) for key in keys_dense},
        )

    def unpack(self, index: int) -> tuple[ClientUpdate, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        update = ClientUpdate(
            self.clients[index],
            int(self.num_examples[index]),
            self.item_ids[start:end].astype(np.int64),
            {key: value[start:end].astype(np.float32) for key, value in self.rows.items()},
            {key: value[index].astype(np.float32) for key, value in self.dense.items()},
            0.0,
        )
        return update, self.touched[self.touched_offsets[index] : self.touched_offsets[index + 1]].astype(np.int64)

    def all(self) -> list[tuple[ClientUpdate, np.ndarray]]:
        return [self.unpack(i) for i in range(len(self.clients))]

    def select(self, client_ids: list[str] | set[str]) -> PackedUpdates:
        """The updates of these clients (each must be here), without unpacking the others."""
        wanted = set(client_ids)
        chosen = np.array([client in wanted for client in self.clients], dtype=bool)
        if chosen.sum() != len(wanted):
            missing = sorted(wanted - set(self.clients))
            raise KeyError(missing[0])
        row_mask = np.repeat(chosen, np.diff(self.offsets))
        touched_mask = np.repeat(chosen, np.diff(self.touched_offsets))
        return PackedUpdates(
            [client for client, keep in zip(self.clients, chosen, strict=True) if keep],
            self.num_examples[chosen],
            _offsets(np.diff(self.offsets)[chosen]),
            self.item_ids[row_mask],
            _offsets(np.diff(self.touched_offsets)[chosen]),
            self.touched[touched_mask],
            {key: value[row_mask] for key, value in self.rows.items()},
            {key: value[chosen] for key, value in self.dense.items()},
        )

    def compacted(self, alpha: float) -> PackedUpdates:
        """FRU's storage rule for every client at once: each keeps the `alpha` share (at least one)
        of its rows whose change is largest (ties: the earlier row), in row order; `touched` stays."""
        lengths = np.diff(self.offsets)
        if not self.rows or not len(self.item_ids):
            return self
        norms = np.sqrt(sum((value.astype(np.float64) ** 2).sum(axis=1) for value in self.rows.values()))
        client_of_row = np.repeat(np.arange(len(self.clients)), lengths)
        order = np.lexsort((-norms, client_of_row))  # by client, then largest change; stable
        rank = np.arange(len(order)) - self.offsets[client_of_row[order]]
        keep = np.where(lengths > 0, np.maximum(1, np.ceil(alpha * lengths)), 0).astype(np.int64)
        chosen = np.sort(order[rank < keep[client_of_row[order]]])
        return PackedUpdates(
            self.clients, self.num_examples, _offsets(keep), self.item_ids[chosen], self.touched_offsets,
            self.touched, {key: value[chosen] for key, value in self.rows.items()}, self.dense,
        )  # fmt: skip


def _offsets(lengths: list[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


Part = tuple[int, np.ndarray, np.ndarray, Arrays, Arrays]  # examples, item ids, touched ids, rows, dense


def _mean_step(model: SplitModel, shared: Arrays, parts: list[Part], server_lr: float, dense_lr: float) -> Arrays:
    """The server's step (float64, full shapes) from the clients' parts, in client-id order: for
    each item row the example-count-weighted mean change over the clients that touched it, times
    `server_lr`; the FedAvg mean for dense layers, times `dense_lr`. A loop over clients adding
    into the (items, d) total: measured faster than one sparse product over the concatenated
    round, whose float64 temporaries (hundreds of MB for a full ML-100K round) cost more than the
    loop (docs/RESULTS.md)."""
    delta = {key: np.zeros(value.shape, dtype=np.float64) for key, value in shared.items()}
    if not parts:
        return delta
    row_weight = np.zeros(model.n_items, dtype=np.float64)
    for examples, _, touched, _, _ in parts:
        row_weight[touched] += examples
    carried = row_weight > 0
    for key in model.row_keys:
        total = delta[key]
        for examples, item_ids, _, rows, _ in parts:
            total[item_ids] += examples * rows[key].astype(np.float64)
        total[carried] = server_lr * total[carried] / row_weight[carried, None]
    weight = float(sum(examples for examples, *_ in parts))
    for key in model.dense_keys(shared):
        delta[key] = dense_lr * sum(examples * dense[key].astype(np.float64) for examples, *_, dense in parts)
        delta[key] /= weight
    return delta


def packed_delta(
    model: SplitModel, shared: Arrays, packed: PackedUpdates, server_lr: float, dense_lr: float = 1.0
) -> Arrays:
    """The server's step over a packed round (see _mean_step), read from slices of its arrays."""
    parts = []
    for i in range(len(packed.clients)):
        rows = slice(packed.offsets[i], packed.offsets[i + 1])
        touched = packed.touched[packed.touched_offsets[i] : packed.touched_offsets[i + 1]]
        table_rows = {key: value[rows] for key, value in packed.rows.items()}
        dense = {key: value[i] for key, value in packed.dense.items()}
        parts.append((int(packed.num_examples[i]), packed.item_ids[rows], touched, table_rows, dense))
    return _mean_step(model, shared, parts, server_lr, dense_lr)


def aggregate_delta(
    model: SplitModel,
    shared: Arrays,
    updates: list[ClientUpdate],
    server_lr: float,
    dense_lr: float = 1.0,
    touched: list[np.ndarray] | None = None,
) -> Arrays:
    """_mean_step of these updates; `touched[i]` (default: the rows update i carries) are the rows
    whose weight update i counts in: a compact update touched more rows than it kept. Summed in
    client-id order, so arrival order never matters."""
    order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
    rows_counted = [u.item_ids for u in updates] if touched is None else touched
    parts = [(updates[i].num_examples, updates[i].item_ids, rows_counted[i], updates[i].rows, updates[i].dense)
             for i in order]  # fmt: skip
    return _mean_step(model, shared, parts, server_lr, dense_lr)


def apply_delta(shared: Arrays, delta: Arrays) -> Arrays:
    return {key: (value + delta[key]).astype(np.float32) for key, value in shared.items()}


def aggregate(
    model: SplitModel, shared: Arrays, updates: list[ClientUpdate], server_lr: float, dense_lr: float = 1.0
) -> Arrays:
    """The new shared parameters after one round (see _mean_step)."""
    return apply_delta(shared, aggregate_delta(model, shared, updates, server_lr, dense_lr))
