"""The server's optimizer on the aggregated item rows (`train.server_optimizer`).

`sgd` is the plain server step: `train.server_lr` times the row-wise mean change. `adam` and `yogi`
are FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), with the
update rules of Flower's strategies (flwr.serverapp.strategy.FedAdam / FedYogi: beta_1 0.9,
beta_2 0.99, tau 1e-3), the mean change taken as the pseudo-gradient. Flower applies them to whole
arrays; here only the rows some client touched in the round move, and only their moments update
(as torch's SparseAdam does), so a row nobody trains keeps its value instead of drifting on old
momentum. Adam's bias correction counts each row's own updates (Flower counts rounds, which a
row-wise state does not have). Dense layers (NCF's MLP) keep the plain FedAvg step.
"""

from __future__ import annotations

import numpy as np

from fedunlearn.models.base import Arrays

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
BETA_1, BETA_2, TAU = 0.9, 0.99, 1e-3  # Flower's FedAdam / FedYogi defaults


class RowwiseAdaptive:
    """FedAdam / FedYogi moments for every item row, updated only on the rows a round carries."""

    def __init__(self, rule: str, lr: float, shapes: dict[str, tuple[int, ...]]) -> None:
        if rule not in ("adam", "yogi"):
            raise ValueError(f"no row-wise adaptive rule {rule!r}")
        self.rule, self.lr, self.shapes = rule, lr, shapes
        self.reset()

    def reset(self) -> None:
        """Fresh moments: a training that starts again from the initial model (Retrain) starts here."""
        self.first = {key: np.zeros(shape) for key, shape in self.shapes.items()}
        self.second = {key: np.zeros(shape) for key, shape in self.shapes.items()}
        self.updates = np.zeros(next(iter(self.shapes.values()))[0], dtype=np.int64)  # per item row, every table

    def step(self, mean_change: Arrays, carried: np.ndarray) -> Arrays:
        """The server's step on each row table from the row-wise mean change (float64, full shape);
        rows outside `carried` (a boolean mask over items) get exactly zero."""
        self.updates[carried] += 1
        lr = np.full(int(carried.sum()), self.lr)
        if self.rule == "adam":
            count = self.updates[carried]
            lr *= np.sqrt(1 - BETA_2**count) / (1 - BETA_1**count)
        steps = {}
        for key, change in mean_change.items():
            g = change[carried]
            first, second = self.first[key], self.second[key]
            first[carried] = BETA_1 * first[carried] + (1 - BETA_1) * g
            if self.rule == "adam":
                second[carried] = BETA_2 * second[carried] + (1 - BETA_2) * g**2
            else:
                second[carried] -= (1 - BETA_2) * g**2 * np.sign(second[carried] - g**2)
            step = np.zeros(change.shape)
            step[carried] = lr[:, None] * first[carried] / (np.sqrt(second[carried]) + TAU)
            steps[key] = step
        return steps

    def state(self) -> Arrays:
        arrays = {f"first/{key}": value for key, value in self.first.items()}
        arrays |= {f"second/{key}": value for key, value in self.second.items()}
        return arrays | {"updates": self.updates}

    def load_state(self, arrays: Arrays) -> None:
        for key in self.shapes:
            self.first[key] = np.array(arrays[f"first/{key}"], dtype=np.float64)
            self.second[key] = np.array(arrays[f"second/{key}"], dtype=np.float64)
        self.updates = np.array(arrays["updates"], dtype=np.int64)


def row_optimizer(rule: str, lr: float, shapes: dict[str, tuple[int, ...]]) -> RowwiseAdaptive | None:
    """The adaptive server optimizer for these row tables, or None for the plain `sgd` step."""
    return None if rule == "sgd" else RowwiseAdaptive(rule, lr, shapes)
