"""D2D-R and U2U-R (Li et al., MM 2023) as federated post-training defences with a fixed weight.

Both minimise `distance + weight * mean ||e - e_original||^2` (mean over clients, so both terms
are on the same per-client scale) over the defending clients' own embeddings with Adam, and need
only per-class sums from the secure aggregate:
- D2D-R: the distance between each group's embedding distribution and everyone's, as a
  multi-kernel RBF MMD made decomposable by random Fourier features (sum_k n_k/n |phi_k - phi|^2,
  phi_k the class mean of the features); the bandwidths are relative to the embeddings'
  root-mean-square norm, read from one round of class sums (sum ||e||^2 is their trace).
- U2U-R: the user-to-user graph loss on the complete cross-group graph (every pair of users of
  different groups pulled together, mean over pairs), a function of the class counts, sums and
  outer-product sums (AttrCloak's class sums).

Either way the server differentiates the loss with respect to the sums and broadcasts that; each
client's gradient is its own contribution's Jacobian applied to it (`client_gradient`), so every
answer the server gets is a sum. As for AttrCloak (fedunlearn.privacy.attrcloak), the server's side
is one loop, `regularise`, over a `RegularisedClients`: in-process `MatrixRegularised` holds the
clients as rows of one matrix (Adam is element-wise, so one Adam over it is each client's own); on
Flower (server/defence.py) each client keeps its embedding and Adam state and steps itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from fedunlearn.privacy.attrcloak import client_attribute_gradient
from fedunlearn.privacy.common import (
    LEFT_OUT,
    Aggregator,
    AttributeClasses,
    DefenceOutcome,
    PlainSum,
    StepDone,
    moving,
    no_progress,
)
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.privacy.registry import DEFENCES

BANDWIDTHS = (0.5, 1.0, 2.0, 4.0)  # RBF bandwidths relative to the embeddings' root-mean-square norm
FEATURES_PER_KERNEL = 256


def uses_kernel(method: str) -> bool:
    """D2D-R: the distance is a kernel one, on random Fourier features of the embeddings."""
    return DEFENCES[method].variant == "kernel"


# per attribute, dL/d(the class sums) as broadcast: D2D-R (dL/dfeature sums (K, F),);
# U2U-R (dL/dsums (K, d), symmetrised dL/douters (K, d, d))
SumsGradient = tuple[torch.Tensor, ...]


def broadcast_problem(method: str, gradients: Sequence[SumsGradient], labels: Sequence[int], dim: int) -> str | None:
    """Why a client cannot take the server's broadcast `gradients` (one per attribute; `method`
    an AttrCloak variant, D2D-R or U2U-R) for its `dim`-dim embedding and class `labels[j]` in each,
    or None: a part of another shape would broadcast into a silently wrong step."""
    if method not in DEFENCES:
        return f"unknown defence {method!r}; the clients know {', '.join(DEFENCES)}"
    if len(gradients) != len(labels):
        return f"{len(gradients)} attributes' gradients for a client that defends {len(labels)}"
    for label, parts in zip(labels, gradients, strict=True):
        k = len(parts[0]) if parts else 0
        features = len(BANDWIDTHS) * FEATURES_PER_KERNEL
        expected = [(k, features)] if uses_kernel(method) else [(k, dim), (k, dim, dim)]
        shapes = [tuple(part.shape) for part in parts]
        if shapes != expected or not (0 <= label < k or label == LEFT_OUT):
            return f"{method} gradients of shapes {shapes} do not fit a {dim}-dim embedding of class {label}"
        if not all(torch.isfinite(torch.as_tensor(part)).all() for part in parts):
            return f"the broadcast {method} gradients are not finite"
    return None


class FourierFeatures:
    """phi(e) with phi(x).phi(y) ~ mean over kernels of exp(-|x - y|^2 / (2 h^2)); every client
    builds the same one from (dim, scale, seed)."""

    def __init__(self, dim: int, scale: float, seed: int) -> None:
        self.dim, self.scale, self.seed = dim, scale, seed
        rng = np.random.default_rng(seed)
        blocks = [rng.normal(0, 1 / (h * scale), size=(dim, FEATURES_PER_KERNEL)) for h in BANDWIDTHS]
        self.weights = torch.tensor(np.concatenate(blocks, axis=1))
        self.phase = torch.tensor(rng.uniform(0, 2 * np.pi, self.weights.shape[1]))
        self.norm = np.sqrt(2.0 / self.weights.shape[1])

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.norm * torch.cos(embeddings @ self.weights + self.phase)


def mean_square_norm(sums: ClassSums) -> float:
    """The mean ||e||^2 over the clients, from class sums of any attribute (the outers' trace)."""
    return float(np.trace(sums.outers.sum(0)) / sums.counts.sum())


def feature_contribution(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """What each client adds to D2D-R's secure sum: (n, K + K F), its one-hot class, then its
    Fourier features in its class's block (zero elsewhere; all zero for a LEFT_OUT client)."""
    labels = np.asarray(labels)
    one_hot = np.eye(n_classes)[np.maximum(labels, 0)] * (labels != LEFT_OUT)[:, None]
    per_class = (one_hot[:, :, None] * features[:, None]).reshape(len(features), -1)
    return np.concatenate([one_hot, per_class], axis=1)


def d2d_loss(total: np.ndarray, n_classes: int) -> tuple[float, torch.Tensor]:
    """The MMD between each class and everyone, from the summed `feature_contribution`s; and its
    gradient with respect to the per-class feature sums (K, F). An empty class adds nothing."""
    k = n_classes
    counts = torch.tensor(np.rint(total[:k]))
    sums = torch.tensor(total[k:].reshape(k, -1), requires_grad=True)
    means = sums / counts.clamp(min=1)[:, None]
    overall = sums.sum(0) / counts.sum()
    loss = (counts / counts.sum() * ((means - overall) ** 2).sum(1)).sum()
    (grad_sums,) = torch.autograd.grad(loss, sums)
    return float(loss.detach()), grad_sums


def u2u_loss(sums: ClassSums) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean |e_u - e_v|^2 over the cross-group pairs, from the class sums: over those pairs,
    sum |e_u - e_v|^2 = sum_c (n - n_c) tr(O_c) - (|S|^2 - sum_c |S_c|^2); and its gradients with
    respect to the sums and (symmetrised) the outer-product sums."""
    counts = torch.tensor(sums.counts, dtype=torch.float64)
    class_sums = torch.tensor(sums.sums, dtype=torch.float64, requires_grad=True)
    outers = torch.tensor(sums.outers, dtype=torch.float64, requires_grad=True)
    n = counts.sum()
    pairs = (n**2 - (counts**2).sum()) / 2
    if pairs <= 0:  # every client in one class: no cross-group pair to pull together (0 / 0 was NaN)
        return 0.0, torch.zeros_like(class_sums), torch.zeros_like(outers)
    squares = torch.diagonal(outers, dim1=-2, dim2=-1).sum(-1)
    total = ((n - counts) * squares).sum() - ((class_sums.sum(0) ** 2).sum() - (class_sums**2).sum())
    loss = total / pairs
    grad_sums, grad_outers = torch.autograd.grad(loss, [class_sums, outers])
    return float(loss.detach()), grad_sums, grad_outers + grad_outers.transpose(-1, -2)


def client_gradient(
    method: str,
    current: torch.Tensor,
    original: torch.Tensor,
    labels: Sequence[np.ndarray],
    gradients: Sequence[SumsGradient],
    weight: float,
    n_clients: int,
    phi: FourierFeatures | None,
) -> torch.Tensor:
    """The clients' own gradients (rows of `current`, one client or all of them): the distance's,
    from the broadcast `gradients` and each one's class `labels[j]` per attribute (mean over
    attributes; none from an attribute where it is LEFT_OUT), plus the retention term
    weight * 2 (e - e_original) / n."""
    grad = torch.zeros_like(current)
    for label, gradient in zip(labels, gradients, strict=True):
        index = torch.as_tensor(label)
        if uses_kernel(method):
            assert phi is not None, "D2D-R needs the Fourier features"
            own = current.clone().requires_grad_(True)
            own_gradient = gradient[0][index.clamp(min=0)] * (index != LEFT_OUT)[:, None]
            (part,) = torch.autograd.grad((phi(own) * own_gradient).sum(), own)
        else:
            part = client_attribute_gradient(current, label, gradient[0], gradient[1])
        grad += part / len(gradients)
    return grad + weight * 2 * (current - original) / n_clients


class RegularisedClients(Protocol):
    """The clients as D2D-R's and U2U-R's server sees them: every answer is a sum over clients."""

    def class_sums(self, attribute: int) -> ClassSums:
        """AttrCloak's class sums of attribute `attribute` over the clients' current embeddings."""
        ...

    def scale_sums(self) -> ClassSums:
        """`class_sums(0)`, as precise as D2D-R's scale (their mean ||e||^2) needs."""
        ...

    def feature_sums(self, attribute: int, phi: FourierFeatures) -> np.ndarray:
        """The sum of `feature_contribution` over the clients' current embeddings."""
        ...

    def step(self, gradients: list[SumsGradient], phi: FourierFeatures | None) -> None:
        """Each defending client takes its Adam step along its `client_gradient`."""
        ...


def regularise(
    clients: RegularisedClients, method: str, classes: Sequence[int], steps: int, seed: int,
    step_done: StepDone = no_progress,
) -> list[float]:  # fmt: skip
    """D2D-R's or U2U-R's server loop (`classes`: the number of classes per attribute); returns
    the distance per step (mean over attributes)."""
    if method not in DEFENCES or DEFENCES[method].loop != "regularised":
        regularised = [name for name, entry in DEFENCES.items() if entry.loop == "regularised"]
        raise ValueError(f"unknown regularised defence {method!r}: choose one of {', '.join(regularised)}")
    if not classes:  # every attribute left out (fedunlearn.privacy.cells): nothing to defend
        return []
    phi = None
    if uses_kernel(method):
        sums = clients.scale_sums()
        phi = FourierFeatures(sums.sums.shape[1], float(np.sqrt(mean_square_norm(sums))) or 1.0, seed)
    losses = []
    for _ in range(steps):
        gradients: list[SumsGradient] = []
        loss = 0.0
        for attribute, n_classes in enumerate(classes):
            if phi is not None:
                value, grad_sums = d2d_loss(clients.feature_sums(attribute, phi), n_classes)
                gradients.append((grad_sums,))
            else:
                value, grad_sums, grad_outers = u2u_loss(clients.class_sums(attribute))
                gradients.append((grad_sums, grad_outers))
            loss += value / len(classes)
        clients.step(gradients, phi)
        losses.append(loss)
        step_done()
    return losses


class MatrixRegularised:
    """In-process: all clients as the rows of one matrix, the per-client work vectorised."""

    def __init__(
        self,
        embeddings: np.ndarray,
        attributes: list[AttributeClasses],
        method: str,
        lr: float,
        weight: float,
        defending: np.ndarray,
        aggregator: Aggregator,
    ) -> None:
        self.attributes, self.method, self.weight, self.aggregator = attributes, method, weight, aggregator
        self.original = torch.tensor(embeddings, dtype=torch.float64)
        self.current = self.original.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.current], lr=lr)
        self.mask = torch.as_tensor(moving(defending, attributes), dtype=torch.float64)[:, None]

    def class_sums(self, attribute: int) -> ClassSums:
        return self.aggregator.class_sums(self.current.detach().numpy(), self.attributes[attribute])

    def scale_sums(self) -> ClassSums:
        return self.class_sums(0)

    def feature_sums(self, attribute: int, phi: FourierFeatures) -> np.ndarray:
        classes = self.attributes[attribute]
        features = phi(self.current.detach()).numpy()
        return self.aggregator.total(feature_contribution(features, classes.labels, classes.n_classes))

    def step(self, gradients: list[SumsGradient], phi: FourierFeatures | None) -> None:
        labels = [attribute.labels for attribute in self.attributes]
        values = self.current.detach()
        grad = client_gradient(self.method, values, self.original, labels, gradients, self.weight, len(values), phi)
        self.optimizer.zero_grad()
        self.current.grad = grad * self.mask
        self.optimizer.step()


def regularised_defence(
    embeddings: np.ndarray,
    attributes: list[AttributeClasses],
    method: str,
    steps: int,
    lr: float,
    weight: float,
    defending: np.ndarray,
    seed: int,
    aggregator: Aggregator | None = None,
    step_done: StepDone = no_progress,
) -> DefenceOutcome:
    """D2D-R or U2U-R (`method`, a regularised entry of DEFENCES) for `steps` Adam steps of the defending clients."""
    started = time.perf_counter()
    clients = MatrixRegularised(embeddings, attributes, method, lr, weight, defending, aggregator or PlainSum())
    classes = [attribute.n_classes for attribute in attributes]
    losses = regularise(clients, method, classes, steps, seed, step_done)
    return DefenceOutcome(clients.current.detach().numpy(), losses, [weight] * steps, time.perf_counter() - started)
