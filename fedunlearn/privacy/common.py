"""What every attribute defence shares: the secure-sum interface the server reads the clients
through, per-class sums of the clients' embeddings, users flattened to one embedding row each, a
client's own Adam step, and the outcome a defence returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.privacy.gaussian import ClassSums

StepDone = Callable[[], None]  # called after each step of a defence's loop (progress)


def no_progress() -> None:
    """The StepDone of a defence nobody watches."""


class Aggregator(Protocol):
    """Adds up the clients' contributions so that no party sees one of them (Flower: SecAgg+)."""

    def class_sums(self, embeddings: np.ndarray, attribute: AttributeClasses) -> ClassSums: ...

    def total(self, contributions: np.ndarray) -> np.ndarray: ...


class PlainSum:
    """The in-process stand-in for secure aggregation: the only place contributions meet. It
    adds the same numbers `class_contribution` would send, without building them client by client."""

    def class_sums(self, embeddings: np.ndarray, attribute: AttributeClasses) -> ClassSums:
        return ClassSums.of(embeddings, attribute.labels, attribute.n_classes)

    def total(self, contributions: np.ndarray) -> np.ndarray:
        return contributions.sum(axis=0)


LEFT_OUT = -1  # the class label of a client that sends zeros to a defence's sums (fedunlearn.privacy.cells)


@dataclass
class AttributeClasses:
    name: str
    labels: np.ndarray  # (n,) class index per client, or LEFT_OUT
    n_classes: int


def moving(defending: np.ndarray, attributes: list[AttributeClasses]) -> np.ndarray:
    """The defending clients that are in some attribute's sums: a client LEFT_OUT of all of them
    (or of a defence with no attribute) takes no step, as no attribute gradient reaches it."""
    inside = [attribute.labels != LEFT_OUT for attribute in attributes]
    return np.asarray(defending, dtype=bool) & np.any(inside, axis=0) if inside else np.zeros(len(defending), bool)


def class_contribution(embedding: np.ndarray, label: int, n_classes: int) -> np.ndarray:
    """What one client sends to the secure sum: (K + K d + K d d,), zero outside its own class
    (everywhere if it is LEFT_OUT)."""
    e = embedding.astype(np.float64)
    one_hot = np.eye(n_classes)[label] if label != LEFT_OUT else np.zeros(n_classes)
    return np.concatenate([one_hot, np.outer(one_hot, e).ravel(), np.kron(one_hot, np.outer(e, e).ravel())])


def unpack_class_sums(total: np.ndarray, n_classes: int, dim: int) -> ClassSums:
    k, d = n_classes, dim
    return ClassSums(total[:k], total[k : k + k * d].reshape(k, d), total[k + k * d :].reshape(k, d, d))


@dataclass
class DefenceOutcome:
    embeddings: np.ndarray | None  # (n, D) after the defence (None on Flower: only the clients hold them)
    losses: list[float]  # L_AU per step
    weights: list[float]  # AttrCloak: its weight a on the attribute loss per step; D2D-R / U2U-R: the retention weight
    seconds: float
    retention_shares: list[float] = field(default_factory=list)  # AttrCloak: attrcloak.retention_share per step


def flatten_users(model: SplitModel, users: list[Arrays]) -> np.ndarray:
    """(n, D): each client's user part as one vector (NCF: GMF then MLP embedding)."""
    keys = sorted(users[0])
    return np.stack([np.concatenate([user[key] for key in keys]) for user in users]).astype(np.float64)


def unflatten_users(users: list[Arrays], flat: np.ndarray) -> list[Arrays]:
    keys = sorted(users[0])
    sizes = np.cumsum([len(users[0][key]) for key in keys])[:-1]
    return [dict(zip(keys, (part.astype(np.float32) for part in np.split(row, sizes)), strict=True)) for row in flat]


@dataclass
class AdamState:
    """One client's Adam moments for its own embedding (torch.optim.Adam's, element-wise)."""

    step: int
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray


def adam_step(current: np.ndarray, grad: np.ndarray, adam: AdamState | None, lr: float) -> tuple[np.ndarray, AdamState]:
    """One client's step of torch.optim.Adam on its own row, resumed from `adam`: the new embedding
    and Adam state."""
    param = torch.tensor(current, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=lr)
    if adam is not None:
        optimizer.state[param] = {
            "step": torch.tensor(float(adam.step)),
            "exp_avg": torch.tensor(adam.exp_avg, dtype=torch.float64),
            "exp_avg_sq": torch.tensor(adam.exp_avg_sq, dtype=torch.float64),
        }
    param.grad = torch.as_tensor(grad, dtype=torch.float64)
    optimizer.step()
    state = optimizer.state[param]
    moments_ = AdamState(int(state["step"]), state["exp_avg"].numpy().copy(), state["exp_avg_sq"].numpy().copy())
    return param.detach().numpy().copy(), moments_
