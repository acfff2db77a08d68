"""D2D-R and U2U-R (Li et al., MM 2023) as federated post-training defences with a fixed weight.

Both minimise `distance + weight * mean ||e - e_original||^2` (mean over clients, so both terms
are on the same per-client scale) over the defending clients' own embeddings with Adam, and need
only per-class sums from the secure aggregate:
- D2D-R: the distance between each group's embedding distribution and everyone's, as a
  multi-kernel RBF MMD made decomposable by random Fourier features (sum_k n_k/n |phi_k - phi|^2,
  phi_k the class mean of the features); a client's gradient is its own feature Jacobian applied to
  dL/dsum_c, which anyone can compute from the sums.
- U2U-R: the user-to-user graph loss on the complete cross-group graph (every pair of users of
  different groups pulled together, mean over pairs); its gradient for a user of class c is
  2 ((n - n_c) e - (S - S_c)) / pairs, from class counts and sums.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedunlearn.privacy.attrcloak import Aggregator, AttributeClasses, DefenceOutcome, PlainSum

BANDWIDTHS = (0.5, 1.0, 2.0, 4.0)  # RBF bandwidths relative to the embeddings' median norm
FEATURES_PER_KERNEL = 256


class FourierFeatures:
    """phi(e) with phi(x).phi(y) ~ mean over kernels of exp(-|x - y|^2 / (2 h^2))."""

    def __init__(self, dim: int, scale: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        blocks = [rng.normal(0, 1 / (h * scale), size=(dim, FEATURES_PER_KERNEL)) for h in BANDWIDTHS]
        self.weights = torch.tensor(np.concatenate(blocks, axis=1))
        self.phase = torch.tensor(rng.uniform(0, 2 * np.pi, self.weights.shape[1]))
        self.norm = np.sqrt(2.0 / self.weights.shape[1])

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.norm * torch.cos(embeddings @ self.weights + self.phase)


def _d2d_gradient(
    values: torch.Tensor, attribute: AttributeClasses, phi: FourierFeatures, aggregator: Aggregator
) -> tuple[torch.Tensor, float]:
    one_hot = np.eye(attribute.n_classes)[attribute.labels]
    features = phi(values)
    k = attribute.n_classes
    per_class = (one_hot[:, :, None] * features.numpy()[:, None]).reshape(len(values), -1)
    summed = aggregator.total(np.concatenate([one_hot, per_class], 1))
    counts = torch.tensor(summed[:k])
    sums = torch.tensor(summed[k:].reshape(k, -1), requires_grad=True)
    means = sums / counts.clamp(min=1)[:, None]
    overall = sums.sum(0) / counts.sum()
    loss = (counts / counts.sum() * ((means - overall) ** 2).sum(1)).sum()
    (grad_sums,) = torch.autograd.grad(loss, sums)
    own = values.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((phi(own) * grad_sums[torch.as_tensor(attribute.labels)]).sum(), own)
    return grad, float(loss.detach())


def _u2u_gradient(
    values: torch.Tensor, attribute: AttributeClasses, aggregator: Aggregator
) -> tuple[torch.Tensor, float]:
    sums = aggregator.class_sums(values.numpy(), attribute)
    counts, class_sums = torch.tensor(sums.counts), torch.tensor(sums.sums)
    n, total = counts.sum(), class_sums.sum(0)
    pairs = (n**2 - (counts**2).sum()) / 2
    own = torch.as_tensor(attribute.labels)
    grad = 2 * ((n - counts[own])[:, None] * values - (total - class_sums[own])) / pairs
    # over cross-group pairs, sum |e_u - e_v|^2 = sum_u (n - n_c) |e_u|^2 - (|S|^2 - sum_c |S_c|^2)
    squares = (values**2).sum(1).numpy()[:, None]
    norms = torch.tensor(aggregator.total(np.eye(attribute.n_classes)[attribute.labels] * squares))
    loss = ((n - counts) * norms).sum() - ((total**2).sum() - (class_sums**2).sum())
    return grad, float(loss / pairs)


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
) -> DefenceOutcome:
    """D2D-R (`method="d2d-r"`) or U2U-R (`"u2u-r"`) for `steps` Adam steps of the defending clients."""
    started = time.perf_counter()
    aggregator = aggregator or PlainSum()
    original = torch.tensor(embeddings, dtype=torch.float64)
    current = original.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([current], lr=lr)
    scale = float(np.median(np.linalg.norm(embeddings, axis=1))) or 1.0
    phi = FourierFeatures(embeddings.shape[1], scale, seed)
    mask = torch.as_tensor(defending, dtype=torch.float64)[:, None]
    losses = []
    for _ in range(steps):
        values = current.detach()
        grad, loss = torch.zeros_like(values), 0.0
        for attribute in attributes:
            if method == "d2d-r":
                part, value = _d2d_gradient(values, attribute, phi, aggregator)
            else:
                part, value = _u2u_gradient(values, attribute, aggregator)
            grad += part / len(attributes)
            loss += value / len(attributes)
        optimizer.zero_grad()
        current.grad = (grad + weight * 2 * (values - original) / len(values)) * mask
        optimizer.step()
        losses.append(loss)
    return DefenceOutcome(current.detach().numpy(), losses, [weight] * steps, time.perf_counter() - started)
