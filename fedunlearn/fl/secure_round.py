"""Secure aggregation of a training round (`defence.upload = "secagg"`): the server learns only the
sum of the round's uploads, never one client's.

The server's row-wise weighted mean (aggregation._mean_step) needs, per item row, the sum of
`examples * change` over the clients that touched it and the sum of their `examples`; per dense
layer the same two sums. So each client contributes one dense vector over the whole catalogue
(`SecureLayout.contribution`): its weighted changes, its weight on every row it touched, its
weight, and the three numbers the round loop counts (loss, epochs, optimizer steps). Secure
aggregation (SecAgg+ on Flower, `server.secure_sum`; an exact sum in the simulation engines) adds
the vectors, and `RoundSum.delta` divides the sums: the same step as the plain aggregation, up to
float rounding (and SecAgg+'s quantisation on Flower).

Each entry is scaled into [-1, 1] with public numbers (the most examples any client can report,
`defence.secagg_bound` on a weighted change, caps on loss, epochs and steps), the range SecAgg+
quantises; a client whose contribution falls outside refuses, as the Flower client does, rather than
be clipped silently. What the server cannot do any more: check, clip or robustly aggregate single
uploads, or keep them in a history (so no FedEraser, FRU or FedAccum: config.validate says so).

A row only one client touched would sum to that client's change (and its weight names the client
when the server knows example counts). So a round takes two secure sums when
`defence.secagg_min_clients` is above 1: first each client's touched rows as ones
(`SecureLayout.touched_rows`), which gives the server how many clients touched each row; then the contributions
above, each without the rows fewer than that many clients touched (`kept_rows`): those rows sit out
the round's step."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.replies import LOSS_CAP, cost_problem, layout_problem, loss_problem
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models.base import Arrays, SplitModel

SECURE_UPLOAD = "secagg"


def secure_quorum(min_clients: int) -> int:
    """The fewest clients a secure round takes: two (a sum over one client is its upload), or
    defence.secagg_min_clients when higher (fewer could not move a single item row)."""
    return max(2, min_clients)


def require_secure_quorum(contributors: int, round_number: int, min_clients: int = 1) -> None:
    """A secure sum over one client is that client's upload, and a round with fewer clients than
    defence.secagg_min_clients cannot move a single item row: refuse both (FedUnlearnError)."""
    if contributors < 2:
        raise FedUnlearnError(f"round {round_number}: {contributors} client(s) trained, and a secure sum needs at "
                              "least 2 (over one it is that client's upload): raise train.fraction")  # fmt: skip
    if contributors < min_clients:
        raise FedUnlearnError(f"round {round_number}: {contributors} clients trained and defence.secagg_min_clients = "
                              f"{min_clients}: no item row can reach it, so the item table would not move; lower "
                              "defence.secagg_min_clients or raise train.fraction")  # fmt: skip


@dataclass(frozen=True)
class SecureLayout:
    """Where each part of a client's contribution lies in the summed vector, and its public scale."""

    n_items: int
    row_widths: dict[str, int]  # item table -> d
    dense_shapes: dict[str, tuple[int, ...]]
    max_examples: int  # the most examples any client can report (weights are divided by it)
    bound: float  # the largest |change| of a shared value a client may send (defence.secagg_bound)
    epochs: float  # the epochs asked for (a client reports at most that)
    batch_size: int

    @classmethod
    def of(cls, model: SplitModel, shapes: dict[str, tuple[int, ...]], max_examples: int, bound: float,
           epochs: float, batch_size: int) -> SecureLayout:  # fmt: skip
        """`shapes`: of every shared tensor (the server's parameters, or the model's on a client)."""
        return cls(
            model.n_items,
            {key: int(shapes[key][1]) for key in model.row_keys},
            {key: tuple(shapes[key]) for key in sorted(shapes) if key not in model.row_keys},  # one order on both sides
            int(max_examples), float(bound), float(epochs), int(batch_size),
        )  # fmt: skip

    @property
    def epochs_cap(self) -> float:
        """The most epochs a client can report (a small client rounds its share of an epoch up to
        one example: fl.replies.cost_problem)."""
        return max(1.0, self.epochs + 0.5)

    @property
    def steps_cap(self) -> int:
        return math.ceil(self.max_examples / self.batch_size) * max(1, math.ceil(self.epochs))

    def _offsets(self) -> dict[str, tuple[int, int]]:
        spans: dict[str, tuple[int, int]] = {}
        start = 0
        sizes = {f"rows.{key}": self.n_items * width for key, width in self.row_widths.items()}
        sizes |= {"row_weight": self.n_items}
        sizes |= {f"dense.{key}": math.prod(shape) for key, shape in self.dense_shapes.items()}
        sizes |= {"weight": 1, "loss": 1, "epochs": 1, "steps": 1}
        for name, size in sizes.items():
            spans[name] = (start, start + size)
            start += size
        return spans

    @property
    def size(self) -> int:
        return self._offsets()["steps"][1]

    def add(self, total: np.ndarray, update: ClientUpdate, kept: np.ndarray | None = None) -> None:
        """Add one client's contribution into `total` (float64, `size`) without building it densely,
        its item rows limited to the `kept` ones ((n_items,) bool; None: all). Refuses
        (FedUnlearnError, before adding anything) a contribution that is not finite or would fall
        outside [-1, 1]."""
        self.check(update)
        if kept is not None:
            keep = kept[update.item_ids]
            update = replace(update, item_ids=update.item_ids[keep], rows={k: v[keep] for k, v in update.rows.items()})
        spans, weight = self._offsets(), update.num_examples / self.max_examples
        for key, rows in update.rows.items():
            start, _ = spans[f"rows.{key}"]
            block = total[start : start + self.n_items * self.row_widths[key]].reshape(self.n_items, -1)
            block[update.item_ids] += weight * rows.astype(np.float64) / self.bound
        total[spans["row_weight"][0] + update.item_ids] += weight
        for key, change in update.dense.items():
            start, end = spans[f"dense.{key}"]
            total[start:end] += weight * change.astype(np.float64).ravel() / self.bound
        scalars = {"weight": weight, "loss": update.loss / LOSS_CAP, "epochs": update.epochs / self.epochs_cap,
                   "steps": update.steps / self.steps_cap}  # fmt: skip
        for name, value in scalars.items():
            total[spans[name][0]] += value

    def check(self, update: ClientUpdate) -> None:
        """What the client checks before it contributes: SecAgg+ would clip a value out of range
        silently, so the client refuses instead, with the setting to change."""
        who = f"client {update.client_id}"
        shapes = {key: (self.n_items, width) for key, width in self.row_widths.items()} | self.dense_shapes
        problem = layout_problem(update, self.n_items, shapes, tuple(self.row_widths))
        if problem == "item_range":
            raise FedUnlearnError(f"{who} sends item ids outside 0 .. {self.n_items - 1}, repeated or not integers")
        if problem:
            raise FedUnlearnError(f"{who}'s row or dense changes do not have the model's shapes")
        if not 0 < update.num_examples <= self.max_examples:
            raise FedUnlearnError(f"{who} reports {update.num_examples} examples, outside (0, {self.max_examples}]")
        for key, value in [*update.rows.items(), *update.dense.items()]:
            largest = float(np.abs(value).max()) if value.size else 0.0
            if not math.isfinite(largest):
                raise FedUnlearnError(f"{who}'s change of {key} is not finite: training diverged; lower train.lr")
            if largest > self.bound:  # the value itself is not told: a server choosing the bound would read it
                raise FedUnlearnError(
                    f"{who} changed {key} by more than defence.secagg_bound = {self.bound:g} "
                    "(secure aggregation would clip it): raise defence.secagg_bound"
                )
        if loss_problem(update):
            raise FedUnlearnError(f"{who}'s training loss is outside [0, {LOSS_CAP:g}]: training diverged; lower "
                                  "train.lr or train.server_lr")  # fmt: skip
        if cost_problem(update, self.epochs, self.batch_size) or update.steps > self.steps_cap:
            raise FedUnlearnError(f"{who} reports more epochs or steps than asked ({self.epochs:g} epochs, at most "
                                  f"{self.steps_cap} steps)")  # fmt: skip

    def touched_rows(self, update: ClientUpdate) -> np.ndarray:
        """A client's contribution to the first sum (checked as `add` checks): one on each item row it
        touched, zero elsewhere."""
        self.check(update)
        vector = np.zeros(self.n_items)
        vector[update.item_ids] = 1.0
        return vector

    def contribution(self, update: ClientUpdate, kept: np.ndarray | None = None) -> np.ndarray:
        """The vector one client hands to the secure sum (every entry in [-1, 1])."""
        vector = np.zeros(self.size)
        self.add(vector, update, kept)
        return vector

    def total(self, summed: np.ndarray, contributors: int) -> RoundSum:
        """Read the secure sum of `contributors` contributions back into the round's sums."""
        if summed.shape != (self.size,) or not np.isfinite(summed).all():
            raise FedUnlearnError(f"the secure sum is malformed (shape {summed.shape}, expected ({self.size},))")
        spans = self._offsets()

        def part(name: str) -> np.ndarray:
            start, end = spans[name]
            return summed[start:end]

        return RoundSum(
            {key: part(f"rows.{key}").reshape(self.n_items, width) * self.bound
             for key, width in self.row_widths.items()},  # fmt: skip
            part("row_weight").copy(),
            {key: part(f"dense.{key}").reshape(shape) * self.bound for key, shape in self.dense_shapes.items()},
            float(part("weight")[0]),
            float(part("loss")[0]) * LOSS_CAP,
            float(part("epochs")[0]) * self.epochs_cap,
            float(part("steps")[0]) * self.steps_cap,
            contributors,
        )


def kept_rows(counts: np.ndarray, least: int) -> np.ndarray:
    """(n_items,) bool: the rows at least `least` clients touched, from the first sum (rounded:
    SecAgg+ returns whole counts within its quantisation)."""
    return np.rint(counts) >= least


@dataclass
class RoundSum:
    """A round's uploads as secure aggregation gives them: sums over the clients, weights divided by
    the layout's max_examples (the ratio the mean needs is unchanged)."""

    rows: Arrays  # item table -> (items, d) sum of weight * change
    row_weight: np.ndarray  # (items,) sum of the weights of the clients that touched each row
    dense: Arrays  # dense layer -> sum of weight * change
    weight: float
    loss: float  # summed losses
    epochs: float
    steps: float
    count: int  # contributors

    def delta(self, shared: Arrays, server_lr: float, dense_lr: float) -> Arrays:
        """The server's step: aggregation._mean_step's row-wise weighted mean, from the sums."""
        delta = {key: np.zeros(value.shape, dtype=np.float64) for key, value in shared.items()}
        carried = self.row_weight > 1e-12  # untouched rows sum exactly to zero (SecAgg+ rounds zeros exactly)
        for key, total in self.rows.items():
            delta[key][carried] = server_lr * total[carried] / self.row_weight[carried, None]
        for key, total in self.dense.items():
            delta[key] = dense_lr * total / self.weight
        return delta

    def mean_change(self) -> tuple[np.ndarray, Arrays, Arrays]:
        """What the server knows of the round: the rows anyone touched and the mean change of each
        row and dense layer (the one "upload" the audit's upload attack can read under secagg)."""
        touched = np.flatnonzero(self.row_weight > 1e-12)
        rows = {key: (total[touched] / self.row_weight[touched, None]).astype(np.float32)
                for key, total in self.rows.items()}  # fmt: skip
        dense = {key: (total / self.weight).astype(np.float32) for key, total in self.dense.items()}
        return touched, rows, dense
