"""Class Gaussians from sufficient statistics, Ledoit-Wolf shrinkage, and the Gaussian KL.

The federated AttrCloak never sees embeddings, only per-class sums: count n_k, sum of e, sum of
e e^T (and, once, sum of ||e - mu_k||^4 for the shrinkage intensity). From those this module
rebuilds exactly what scikit-learn's `ledoit_wolf` computes on the raw embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedunlearn.errors import FedUnlearnError


@dataclass
class ClassSums:
    """Sums over the users of each class of one attribute (what secure aggregation returns)."""

    counts: np.ndarray  # (K,)
    sums: np.ndarray  # (K, d)
    outers: np.ndarray  # (K, d, d)

    @classmethod
    def of(cls, embeddings: np.ndarray, classes: np.ndarray, n_classes: int) -> ClassSums:
        """Each user's own contribution, summed: the plain sum that secure aggregation replaces. A
        negative class (privacy.common.LEFT_OUT) is in no class: its user sends zeros."""
        e, classes = embeddings.astype(np.float64), np.asarray(classes)
        counts = np.bincount(classes[classes >= 0], minlength=n_classes).astype(np.float64)
        sums, outers = np.zeros((n_classes, e.shape[1])), np.zeros((n_classes, e.shape[1], e.shape[1]))
        for k in np.flatnonzero(counts):  # one product per class: the three-way einsum was half of DF's time
            members = e[classes == k]
            sums[k], outers[k] = members.sum(0), members.T @ members
        return cls(counts, sums, outers)


def moments(counts: torch.Tensor, sums: torch.Tensor, outers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and maximum-likelihood covariances from sums (batched over the leading axis)."""
    means = sums / counts[..., None]
    covs = outers / counts[..., None, None] - means[..., :, None] * means[..., None, :]
    return means, covs


def ledoit_wolf_shrinkage(cov: np.ndarray, fourth: float, n: float) -> float:
    """scikit-learn's Ledoit-Wolf intensity (`sklearn.covariance.ledoit_wolf_shrinkage`) from the
    empirical covariance, the sum over users of ||x - mean||^4 and the number of users."""
    d = cov.shape[0]
    mu = np.trace(cov) / d
    delta_ = float((cov**2).sum())
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * np.trace(cov) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def shrink(cov: torch.Tensor, shrinkage: torch.Tensor | float) -> torch.Tensor:
    """(1 - s) S + s (tr S / d) I, batched over the leading axis."""
    d = cov.shape[-1]
    mu = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    s = torch.as_tensor(shrinkage, dtype=cov.dtype, device=cov.device)
    return (1 - s)[..., None, None] * cov + (s * mu)[..., None, None] * eye


def shrink_gradient(grad: torch.Tensor, shrinkage: torch.Tensor | float) -> torch.Tensor:
    """dL/dS carried back through `shrink` to dL/dS_empirical: (1 - s) G + s (tr G / d) I."""
    d = grad.shape[-1]
    trace = torch.diagonal(grad, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(d, dtype=grad.dtype, device=grad.device)
    s = torch.as_tensor(shrinkage, dtype=grad.dtype, device=grad.device)
    return (1 - s)[..., None, None] * grad + (s * trace / d)[..., None, None] * eye


@dataclass
class WeightedKL:
    """sum_k w_k KL(N(m0_k, s0_k) || N(m1, s1)), its separation term (sum_k w_k delta_k^T P delta_k / 2:
    how far the class means lie from m1, in its metric) and its gradients (symmetric for the
    covariances)."""

    value: torch.Tensor
    separation: torch.Tensor
    grad_m0: torch.Tensor  # (K, d)
    grad_s0: torch.Tensor  # (K, d, d)
    grad_m1: torch.Tensor  # (d,)
    grad_s1: torch.Tensor  # (d, d)


def weighted_kl(
    weight: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor, m1: torch.Tensor, s1: torch.Tensor,
    covariance: bool = True,
) -> WeightedKL:  # fmt: skip
    """KL(N(m0, s0) || N(m1, s1)) = 0.5 [tr(P s0) + delta^T P delta - d + ln det s1 - ln det s0], with
    P = s1^-1 and delta = m1 - m0, weighted over the leading axis of m0 / s0, and its gradients in
    closed form: d/ds0 = (P - s0^-1) / 2, d/dm0 = -P delta, d/ds1 = (P - P s0 P - P delta delta^T P) / 2,
    d/dm1 = P delta. (Autograd through the Cholesky factors and log determinants of NCF's 128-dim
    class covariances was most of AttrCloak-DF's time.) With `covariance` False the gradients are
    those of the separation term alone (d/ds0 = 0, d/ds1 = -P delta delta^T P / 2); the value stays
    the whole KL."""
    d = m1.shape[-1]
    try:
        chol0, chol1 = torch.linalg.cholesky(s0), torch.linalg.cholesky(s1)
    except torch.linalg.LinAlgError:
        raise FedUnlearnError(
            "AttrCloak's class covariances are singular (too few defending clients per class for the "
            f"{d}-dim embeddings): defend more clients, or use d2d-r / u2u-r on a federation this small"
        ) from None
    inv0, inv1 = torch.cholesky_inverse(chol0), torch.cholesky_inverse(chol1)
    delta = m1 - m0
    solved = delta @ inv1  # P delta for each k (P is symmetric)
    logdet0 = 2 * torch.log(torch.diagonal(chol0, dim1=-2, dim2=-1)).sum(-1)
    logdet1 = 2 * torch.log(torch.diagonal(chol1)).sum()
    separation = 0.5 * (solved * delta).sum(-1)
    kl = 0.5 * ((inv1 * s0).sum((-2, -1)) - d + logdet1 - logdet0) + separation
    w = weight[:, None, None]
    grad_s1_separation = -0.5 * (solved.T * weight) @ solved
    if covariance:
        grad_s0 = 0.5 * w * (inv1 - inv0)
        grad_s1 = 0.5 * (weight.sum() * inv1 - inv1 @ (w * s0).sum(0) @ inv1) + grad_s1_separation
    else:
        grad_s0, grad_s1 = torch.zeros_like(s0), grad_s1_separation
    return WeightedKL(
        (weight * kl).sum(),
        (weight * separation).sum(),
        -weight[:, None] * solved,
        grad_s0,
        (weight[:, None] * solved).sum(0),
        grad_s1,
    )
