"""Who a defence's secure sums may add up: every class (or random cell) of at least MIN_CELL_CLIENTS.

AttrCloak, D2D-R and U2U-R ask for secure sums per class: a count, the sum of e and of e e^T. A
class held by one client sums to its embedding, and one held by two gives both away (the outer
products less half the squared sum leave a rank-one matrix), however securely each is added. So
the server first learns only the counts (a secure sum of one-hot rows), and the members of a class
with fewer than MIN_CELL_CLIENTS clients then send zeros for that attribute: they are left out of
its sums, its loss and its gradient (LEFT_OUT), and are not defended on it. The null level's
pseudo-classes and the covariance brake's (class, half) cells are random cells of the same sums and
follow the same rule, from their own counts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from fedunlearn.privacy.common import LEFT_OUT, AttributeClasses

MIN_CELL_CLIENTS = 3


def kept_cells(counts: np.ndarray) -> np.ndarray:
    """Which cells (classes) a secure sum may hold, from their counts: those of MIN_CELL_CLIENTS or more."""
    return np.asarray(counts) >= MIN_CELL_CLIENTS


def leave_out_small_cells(labels: np.ndarray, n_cells: int) -> np.ndarray:
    """`labels` with the members of every cell of fewer than MIN_CELL_CLIENTS turned LEFT_OUT (the
    in-process path counts directly what the Flower path learns from a secure sum of counts)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=n_cells)
    return np.where((labels >= 0) & kept_cells(counts)[np.maximum(labels, 0)], labels, LEFT_OUT)


def summable_classes(
    attribute: str, values: Sequence[str], counts: np.ndarray, say: bool = True
) -> tuple[list[str], list[str]] | None:
    """An attribute's values (in order) and their counts -> (the classes its sums keep, in order;
    the held values whose clients send zeros), or None when fewer than two classes remain (nothing
    to defend: the defence leaves the attribute out). Says on stderr which values are left out
    (unless `say` is False: the caller said it already)."""
    kept = [str(value) for value, count in zip(values, counts, strict=True) if count >= MIN_CELL_CLIENTS]
    small = [(str(value), int(count)) for value, count in zip(values, counts, strict=True)
             if 0 < count < MIN_CELL_CLIENTS]  # fmt: skip
    if small and say:
        named = ", ".join(repr(value) for value, _ in small[:3]) + (", ..." if len(small) > 3 else "")
        print(f"defence: {attribute}: {len(small)} value(s) held by fewer than {MIN_CELL_CLIENTS} clients ({named}: "
              f"{sum(count for _, count in small)} client(s)) left out of its secure sums, which would give their "
              "embeddings away; they are not defended on it", file=sys.stderr)  # fmt: skip
    if len(kept) < 2 and say:
        print(f"defence: {attribute}: {len(kept)} class(es) of {MIN_CELL_CLIENTS} or more clients, so nothing to "
              "defend: the defence leaves this attribute out", file=sys.stderr)  # fmt: skip
    return (kept, [value for value, _ in small]) if len(kept) >= 2 else None


def keep_summable_classes(attribute: AttributeClasses) -> AttributeClasses:
    """The attribute with its small classes' members LEFT_OUT and the kept classes renumbered in
    order (as the Flower path numbers its kept class list)."""
    labels = leave_out_small_cells(attribute.labels, attribute.n_classes)
    kept = np.flatnonzero(np.bincount(labels[labels >= 0], minlength=attribute.n_classes))
    renumber = np.full(attribute.n_classes, LEFT_OUT)
    renumber[kept] = np.arange(len(kept))
    return AttributeClasses(attribute.name, np.where(labels >= 0, renumber[np.maximum(labels, 0)], LEFT_OUT), len(kept))
