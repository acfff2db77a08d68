"""Who a defence's secure sums may add up: never fewer than MIN_CELL_CLIENTS clients, not even as
the difference of two sums.

AttrCloak, D2D-R and U2U-R ask for secure sums per class: a count, the sum of e and of e e^T. A
class held by one client sums to its embedding, and one held by two gives both away (the outer
products less half the squared sum leave a rank-one matrix), however securely each is added. So
the server first learns only the counts (secure sums of one-hot rows), and:
- the holders of a value fewer than MIN_CELL_CLIENTS clients share are left out of every sum of
  every attribute (LEFT_OUT): left out of one attribute's sums alone, they would be the difference
  of two attributes' totals, which are taken over the same embeddings (a review, 2026-12-08). The
  counts are taken again without them until no class is small (`summable_population`); an
  attribute with fewer than two classes left is not defended at all;
- AttrCloak's covariance brake sums a class per random half only when both halves hold at least
  MIN_CELL_CLIENTS (else the class sum less the kept half gives the other away), and its null level
  uses only draws whose every pseudo-class does (else the total less the kept pseudo-classes does).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_CELL_CLIENTS = 3

# (the defended attributes, per attribute the values whose holders are left out) -> per defended
# attribute the count of each of its values among the clients not left out
Count = Callable[[list[str], dict[str, list[str]]], dict[str, np.ndarray]]


@dataclass
class Population:
    """Who a defence's sums hold: per defended attribute the classes its sums keep (in order), per
    defended attribute the values whose holders are left out of every sum, and how many clients
    that leaves out."""

    classes: dict[str, list[str]]
    left_out: dict[str, list[str]]
    outside: int


def summable_population(values: Mapping[str, Sequence[str]], count: Count, n_clients: int, say: bool = True
                        ) -> Population:  # fmt: skip
    """Count, leave out the holders of small classes, count again, until no class is small; an
    attribute with fewer than two classes of MIN_CELL_CLIENTS is dropped (its sums are never taken,
    so its small values leave no one out). Says on stderr what it left out (unless `say` is False:
    the caller said it already)."""
    defended, left, dropped = list(values), {name: [] for name in values}, []
    while True:
        counts = count(defended, left)
        changed = False
        for name in list(defended):
            held = dict(zip(values[name], counts[name], strict=True))
            if sum(n >= MIN_CELL_CLIENTS for n in held.values()) < 2:
                defended.remove(name)
                del left[name]
                dropped.append(name)
                changed = True
            else:
                small = [str(value) for value, n in held.items() if 0 < n < MIN_CELL_CLIENTS]
                left[name] += small
                changed |= bool(small)
        if not changed:
            break
    classes = {name: [str(v) for v, n in zip(values[name], counts[name], strict=True) if n >= MIN_CELL_CLIENTS]
               for name in defended}  # fmt: skip
    population = int(sum(counts[defended[0]])) if defended else n_clients
    outcome = Population(classes, {name: left[name] for name in defended}, n_clients - population)
    if say:
        _say(outcome, dropped)
    return outcome


def _say(population: Population, dropped: list[str]) -> None:
    for name, left in population.left_out.items():
        if left:
            named = ", ".join(map(repr, left[:3])) + (", ..." if len(left) > 3 else "")
            print(f"defence: {name}: {len(left)} value(s) held by fewer than {MIN_CELL_CLIENTS} clients ({named})",
                  file=sys.stderr)  # fmt: skip
    if population.outside:
        print(f"defence: {population.outside} client(s) hold such a value: they are left out of every attribute's "
              f"secure sums (a sum over fewer than {MIN_CELL_CLIENTS}, or the difference of two attributes' totals, "
              "would give their embeddings away) and are not defended", file=sys.stderr)  # fmt: skip
    for name in dropped:
        print(f"defence: {name}: fewer than two classes of {MIN_CELL_CLIENTS} or more clients, so nothing to defend: "
              "the defence leaves this attribute out", file=sys.stderr)  # fmt: skip


def outside(rows: Mapping[str, np.ndarray], left_out: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Which clients (rows of each attribute's values) hold a left-out value of some attribute."""
    n = len(next(iter(rows.values()))) if rows else 0
    out = np.zeros(n, dtype=bool)
    for name, left in left_out.items():
        out |= np.isin(rows[name], list(left))
    return out


def cell_counts(labels: np.ndarray, n_cells: int) -> np.ndarray:
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=n_cells)


def clean_draw(counts: np.ndarray) -> bool:
    """Whether every non-empty cell of a random draw (the null level's pseudo-classes) holds at
    least MIN_CELL_CLIENTS: only then are its sums taken."""
    counts = np.asarray(counts)
    return bool(np.all((counts == 0) | (counts >= MIN_CELL_CLIENTS)))


def kept_halves(counts: np.ndarray) -> np.ndarray:
    """The covariance brake's cells (class 2c + h, last axis) summed: both halves of a class, when
    each holds at least MIN_CELL_CLIENTS, else neither."""
    counts = np.asarray(counts)
    both = np.minimum(counts[..., 0::2], counts[..., 1::2]) >= MIN_CELL_CLIENTS
    return np.repeat(both, 2, axis=-1)
