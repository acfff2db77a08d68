"""AttrCloak (post-training attribute unlearning), federated: BRIEF section 3.

Each client fine-tunes only its own user part. Per step:
1. every client contributes, for each attribute, its embedding to its own class's sums (count,
   sum of e, sum of e e^T); the sums are added up by an `Aggregator` (secure aggregation on the
   Flower path, a plain sum in-process) so nobody sees a single client's contribution;
2. from the sums, anyone can fit the class Gaussians and the global one (Ledoit-Wolf shrinkage,
   intensity fixed from the embeddings before the defence) and the attribute loss
   L_AU = mean_j sum_k (n_k / n) KL(N_k || N); its derivative with respect to the sums turns
   into each client's own gradient: dL/de = dL/dsum_c + (G_c + G_c^T) e for its class c;
3. each client computes its retention gradient (DD: its own training loss with the item side
   frozen; DF: 2 (e - e_original)); three scalars (sums of g_R.g_R, g_AU.g_R, g_AU.g_AU) are
   summed the same way and give the min-norm weight a = clip((g_R - g_AU).g_R / |g_AU - g_R|^2);
4. every client steps its embedding along a g_AU + (1 - a) g_R with its own Adam state.

Clients here are rows of one matrix because every per-client quantity depends only on that row
and the sums; Adam is element-wise, so one Adam over the matrix is each client's own Adam.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fedunlearn.models import Arrays, SplitModel
from fedunlearn.privacy.gaussian import ClassSums, gaussian_kl, ledoit_wolf_shrinkage, moments, shrink
from fedunlearn.training import recommendation_loss, sample_negatives


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


@dataclass
class AttributeClasses:
    name: str
    labels: np.ndarray  # (n,) class index per client
    n_classes: int


def class_contribution(embedding: np.ndarray, label: int, n_classes: int) -> np.ndarray:
    """What one client sends to the secure sum: (K + K d + K d d,), zero outside its own class."""
    e = embedding.astype(np.float64)
    one_hot = np.eye(n_classes)[label]
    return np.concatenate([one_hot, np.outer(one_hot, e).ravel(), np.kron(one_hot, np.outer(e, e).ravel())])


def unpack_class_sums(total: np.ndarray, n_classes: int, dim: int) -> ClassSums:
    k, d = n_classes, dim
    return ClassSums(total[:k], total[k : k + k * d].reshape(k, d), total[k + k * d :].reshape(k, d, d))


def min_norm_weight(rr: float, ar: float, aa: float, low: float) -> float:
    """The two-task min-norm weight on the attribute loss, from sums of dot products
    (g_R.g_R, g_AU.g_R, g_AU.g_AU), clipped to [low, 1] (DD: 0, DF: 0.1)."""
    denominator = aa - 2 * ar + rr
    if denominator <= 0:  # the two gradients coincide
        return 1.0
    return float(np.clip((rr - ar) / denominator, low, 1.0))


def initial_shrinkage(
    embeddings: np.ndarray, attribute: AttributeClasses, sums: ClassSums, aggregator: Aggregator
) -> np.ndarray:
    """Ledoit-Wolf intensities (K classes, then the global Gaussian): one more secure sum, of
    ||e - mean_c||^4 and ||e - mean||^4, once the means are known from `sums`."""
    counts, means = sums.counts, sums.sums / sums.counts[:, None]
    global_mean = sums.sums.sum(0) / counts.sum()
    fourth_own = np.linalg.norm(embeddings - means[attribute.labels], axis=1) ** 4
    fourth_all = np.linalg.norm(embeddings - global_mean, axis=1) ** 4
    per_client = np.concatenate([np.eye(attribute.n_classes)[attribute.labels] * fourth_own[:, None],
                                 fourth_all[:, None]], axis=1)  # fmt: skip
    fourth = aggregator.total(per_client)
    covs = sums.outers / counts[:, None, None] - means[:, :, None] * means[:, None, :]
    global_cov = sums.outers.sum(0) / counts.sum() - np.outer(global_mean, global_mean)
    intensities = [
        ledoit_wolf_shrinkage(covs[k], fourth[k], counts[k]) if counts[k] >= MIN_CLASS_USERS else 1.0
        for k in range(attribute.n_classes)
    ]
    return np.array([*intensities, ledoit_wolf_shrinkage(global_cov, fourth[-1], counts.sum())])


# Ledoit-Wolf is degenerate below 3 users (at 2 its intensity is exactly 0 and the covariance
# singular): smaller classes stay out of L_AU (they still count in the global Gaussian)
MIN_CLASS_USERS = 3


def attribute_loss(sums: ClassSums, shrinkage: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_j = sum_k (n_k/n) KL(N_k || N) and its gradients with respect to the class sums and
    outer-product sums (symmetrised), which every client can compute from the aggregate."""
    counts = torch.tensor(sums.counts, dtype=torch.float64)
    class_sums = torch.tensor(sums.sums, dtype=torch.float64, requires_grad=True)
    class_outers = torch.tensor(sums.outers, dtype=torch.float64, requires_grad=True)
    means, covs = moments(counts, class_sums, class_outers)
    global_mean, global_cov = moments(counts.sum(), class_sums.sum(0), class_outers.sum(0))
    covs = shrink(covs, torch.tensor(shrinkage[:-1], dtype=torch.float64))
    global_cov = shrink(global_cov, float(shrinkage[-1]))
    present = counts >= MIN_CLASS_USERS
    kl = gaussian_kl(means[present], covs[present], global_mean, global_cov)
    loss = (counts[present] / counts.sum() * kl).sum()
    grad_sums, grad_outers = torch.autograd.grad(loss, [class_sums, class_outers])
    return loss.detach(), grad_sums, grad_outers + grad_outers.transpose(-1, -2)


def client_attribute_gradient(
    embeddings: torch.Tensor, labels: np.ndarray, grad_sums: torch.Tensor, grad_outers: torch.Tensor
) -> torch.Tensor:
    """Each client's own dL/de = dL/dsum_c + (G_c + G_c^T) e: needs only its class and the aggregate."""
    index = torch.as_tensor(labels)
    return grad_sums[index] + torch.einsum("nij,nj->ni", grad_outers[index], embeddings)


@dataclass
class DefenceOutcome:
    embeddings: np.ndarray  # (n, D) after the defence
    losses: list[float]  # L_AU per step
    weights: list[float]  # min-norm weight a per step
    seconds: float


def flatten_users(model: SplitModel, users: list[Arrays]) -> np.ndarray:
    """(n, D): each client's user part as one vector (NCF: GMF then MLP embedding)."""
    keys = sorted(users[0])
    return np.stack([np.concatenate([user[key] for key in keys]) for user in users]).astype(np.float64)


def unflatten_users(users: list[Arrays], flat: np.ndarray) -> list[Arrays]:
    keys = sorted(users[0])
    sizes = np.cumsum([len(users[0][key]) for key in keys])[:-1]
    return [dict(zip(keys, (part.astype(np.float32) for part in np.split(row, sizes)), strict=True)) for row in flat]


class DataRetention:
    """DD: each client's own training loss on a fresh minibatch of its interactions per step,
    item side frozen; the loss is a sum over clients so each row's gradient is its own."""

    def __init__(
        self, model: SplitModel, shared: Arrays, positives: list[np.ndarray], loss: str, negatives: int, seed: int
    ) -> None:
        self.model, self.loss, self.negatives = model, loss, negatives
        self.keys = sorted(model.init_user(np.random.default_rng(0)))
        self.rows = {key: torch.tensor(shared[key], dtype=torch.float64) for key in model.row_keys}
        self.dense = {key: torch.tensor(shared[key], dtype=torch.float64) for key in model.dense_keys(shared)}
        self.positives, self.rng = positives, np.random.default_rng(seed)

    def gradient(self, embeddings: torch.Tensor, batch: int = 32) -> torch.Tensor:
        n_items = next(iter(self.rows.values())).shape[0]
        pos = np.stack([self.rng.choice(p, batch) for p in self.positives])
        neg = np.stack(
            [sample_negatives(self.rng, n_items, np.sort(p), (batch, self.negatives)) for p in self.positives]
        )
        flat = embeddings.detach().requires_grad_(True)
        user = dict(zip(self.keys, (part[:, None, :] for part in flat.split(flat.shape[1] // len(self.keys), 1)),
                        strict=True))  # fmt: skip
        pos_score = self.model.score(user, {k: t[pos] for k, t in self.rows.items()}, self.dense)
        neg_rows = {k: t[neg.reshape(len(pos), -1)] for k, t in self.rows.items()}
        neg_score = self.model.score(user, neg_rows, self.dense).reshape(len(pos), batch, self.negatives)
        # every client has the same batch, so the sum of per-client mean losses is n times the overall mean
        total = len(pos) * recommendation_loss(self.loss, pos_score.reshape(-1), neg_score.reshape(-1, self.negatives))
        (grad,) = torch.autograd.grad(total, flat)
        return grad


def attrcloak(
    embeddings: np.ndarray,
    attributes: list[AttributeClasses],
    variant: str,
    steps: int,
    lr: float,
    defending: np.ndarray,
    retention: DataRetention | None = None,
    aggregator: Aggregator | None = None,
    fixed_weight: float | None = None,
) -> DefenceOutcome:
    """Run AttrCloak-DD (`variant="dd"`, needs `retention`) or -DF for `steps` steps; only the
    clients with `defending[i]` move (everyone contributes to the class sums). The weight on the
    attribute loss is the closed-form min-norm one at every step, or `fixed_weight` if given."""
    started = time.perf_counter()
    aggregator = aggregator or PlainSum()
    original = torch.tensor(embeddings, dtype=torch.float64)
    current = original.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([current], lr=lr)
    shrinkages = []
    for attribute in attributes:
        sums = aggregator.class_sums(embeddings, attribute)
        shrinkages.append(initial_shrinkage(embeddings, attribute, sums, aggregator))
    mask = torch.as_tensor(defending, dtype=torch.float64)[:, None]
    losses, weights = [], []
    for _ in range(steps):
        values = current.detach()
        grad_au, loss_au = torch.zeros_like(values), 0.0
        for attribute, shrinkage in zip(attributes, shrinkages, strict=True):
            sums = aggregator.class_sums(values.numpy(), attribute)
            loss, grad_sums, grad_outers = attribute_loss(sums, shrinkage)
            grad_au += client_attribute_gradient(values, attribute.labels, grad_sums, grad_outers) / len(attributes)
            loss_au += float(loss) / len(attributes)
        grad_r = retention.gradient(values) if variant == "dd" else 2 * (values - original)
        grad_au, grad_r = grad_au * mask, grad_r * mask
        scalars = aggregator.total(
            torch.stack([(grad_r * grad_r).sum(1), (grad_au * grad_r).sum(1), (grad_au * grad_au).sum(1)], 1).numpy()
        )
        weight = min_norm_weight(*scalars, low=0.0 if variant == "dd" else 0.1)
        weight = weight if fixed_weight is None else fixed_weight
        optimizer.zero_grad()
        current.grad = weight * grad_au + (1 - weight) * grad_r
        optimizer.step()
        losses.append(loss_au)
        weights.append(weight)
    return DefenceOutcome(current.detach().numpy(), losses, weights, time.perf_counter() - started)
