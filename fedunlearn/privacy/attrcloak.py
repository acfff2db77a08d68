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

The server's side of a step is `cloak`, over any `CloakClients`: in-process `MatrixClients` runs
the clients as rows of one matrix (every per-client quantity depends only on that row and the sums;
Adam is element-wise, so one Adam over the matrix is each client's own Adam); on Flower
(server/defence.py) each client runs `client_gradients` / `client_products` / `client_step` on its
own device, from the broadcast gradients, and only sums come back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.training import recommendation_loss, sample_negatives
from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.privacy.cells import cell_counts, clean_draw, kept_halves
from fedunlearn.privacy.common import (
    LEFT_OUT,
    AdamState,
    Aggregator,
    AttributeClasses,
    DefenceOutcome,
    PlainSum,
    StepDone,
    adam_step,
    moving,
    no_progress,
)
from fedunlearn.privacy.gaussian import ClassSums, ledoit_wolf_shrinkage, moments, shrink, shrink_gradient, weighted_kl
from fedunlearn.seeding import Stream, client_key, client_uniforms, rng_for

AttributeGradient = tuple[torch.Tensor, torch.Tensor]  # dL_j/dsums (K, d), symmetrised dL_j/douters (K, d, d)


def min_norm_weight(rr: float, ar: float, aa: float, low: float) -> float:
    """The two-task min-norm weight on the attribute loss, from sums of dot products
    (g_R.g_R, g_AU.g_R, g_AU.g_AU), clipped to [low, 1] (DD: 0, DF: 0.1)."""
    denominator = aa - 2 * ar + rr
    if denominator <= 0:  # the two gradients coincide
        return 1.0
    return float(np.clip((rr - ar) / denominator, low, 1.0))


def unit_min_norm_weight(rr: float, ar: float, aa: float, low: float) -> float:
    """`defence.cloak_balance = "unit"`: the min-norm weight of the two gradients scaled to unit
    length (the `l2` normaliser of Sener & Koltun's MGDA code), given as the weight on the raw
    gradients that steps along the same direction: a g_AU / |g_AU| + (1 - a) g_R / |g_R| is
    parallel to w g_AU + (1 - w) g_R with w = a |g_R| / (a |g_R| + (1 - a) |g_AU|). On raw
    gradients the larger one takes the step (DD's training loss on a trained model is 10x the
    attribute loss's: docs/PRIVACY.md); on unit ones each loss gets its share of the step's length."""
    if rr <= 0 or aa <= 0:  # one loss has no gradient: the step is the other's
        return 1.0 if rr <= 0 else 0.0
    r, au = np.sqrt(rr), np.sqrt(aa)
    unit = min_norm_weight(1.0, ar / (r * au), 1.0, low)
    return float(unit * r / (unit * r + (1 - unit) * au))


def retention_share(rr: float, aa: float, weight: float) -> float:
    """The retention part's share of the length of the step w g_AU + (1 - w) g_R (before Adam):
    |(1 - w) g_R| / (|w g_AU| + |(1 - w) g_R|); 0 when neither loss has a gradient."""
    retention, attribute = (1 - weight) * np.sqrt(rr), weight * np.sqrt(aa)
    return float(retention / (retention + attribute)) if retention + attribute > 0 else 0.0


def class_means(sums: ClassSums) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (zero for a class nobody is in) and the global mean, from the sums."""
    counts = sums.counts
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, sums.sums / counts[:, None], 0.0)
    return means, sums.sums.sum(0) / counts.sum()


def fourth_power_contribution(
    embedding: np.ndarray, label: int, means: np.ndarray, global_mean: np.ndarray, n_classes: int
) -> np.ndarray:
    """What one client adds to the shrinkage sum: ||e - mean_c||^4 in its class's slot, ||e - mean||^4 last
    (zeros if it is LEFT_OUT: the means are of the others)."""
    out = np.zeros(n_classes + 1)
    if label == LEFT_OUT:
        return out
    out[label] = np.linalg.norm(embedding - means[label]) ** 4
    out[-1] = np.linalg.norm(embedding - global_mean) ** 4
    return out


# The fourth powers' secure sum. A bound every client must keep is (sum over all clients of
# ||e - mean||^2)^2, about n^2 times a typical client's value, and SecAgg+ rounds each value on a
# grid of 2 bound / Q with Q ~ 2^32 / n: at 6,040 clients the grid step is ~100x a typical value
# and the global shrinkage came out 0.613 instead of 0.713. So each value is split over levels
# whose widths grow by LEVEL_RATIO from about the typical value to that bound, each part sent as a
# share of its level's width (in [0, 1]): a level's rounding error is relative to its own width,
# and only the few large values reach the wide levels (zero is on the grid exactly).
LEVEL_RATIO = 16.0


def fourth_power_levels(typical: float, largest: float) -> np.ndarray:
    """Tops of the levels, from LEVEL_RATIO x `typical` up by LEVEL_RATIO to at least `largest`."""
    tops = [LEVEL_RATIO * max(typical, largest * 1e-30, 1e-300)]
    while tops[-1] < largest:
        tops.append(tops[-1] * LEVEL_RATIO)
    return np.array(tops)


def split_into_levels(values: np.ndarray, tops: np.ndarray) -> np.ndarray:
    """(len(values), L): the part of each value inside each level, as a share of that level's width."""
    bottoms = np.concatenate([[0.0], tops[:-1]])
    return np.clip(np.asarray(values, dtype=np.float64)[:, None] - bottoms, 0.0, tops - bottoms) / (tops - bottoms)


def join_levels(shares: np.ndarray, tops: np.ndarray) -> np.ndarray:
    """The values (or their sums) back from `split_into_levels`' shares (or their sums), (., L)."""
    return shares @ (tops - np.concatenate([[0.0], tops[:-1]]))


def shrinkage_from(sums: ClassSums, fourth: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf intensities (K classes, then the global Gaussian) from the class sums and the
    summed fourth powers; a class below MIN_CLASS_USERS gets 1 (it stays out of L_AU anyway)."""
    counts = sums.counts
    means, global_mean = class_means(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        covs = sums.outers / counts[:, None, None] - means[:, :, None] * means[:, None, :]
    global_cov = sums.outers.sum(0) / counts.sum() - np.outer(global_mean, global_mean)
    intensities = [
        ledoit_wolf_shrinkage(covs[k], fourth[k], counts[k]) if counts[k] >= MIN_CLASS_USERS else 1.0
        for k in range(len(counts))
    ]
    return np.array([*intensities, ledoit_wolf_shrinkage(global_cov, fourth[-1], counts.sum())])


def initial_shrinkage(
    embeddings: np.ndarray, attribute: AttributeClasses, sums: ClassSums, aggregator: Aggregator
) -> np.ndarray:
    """Ledoit-Wolf intensities (K classes, then the global Gaussian): one more secure sum, of
    ||e - mean_c||^4 and ||e - mean||^4, once the means are known from `sums`."""
    return shrinkage_from(sums, aggregator.total(fourth_powers(embeddings, attribute, *class_means(sums))))


def fourth_powers(
    embeddings: np.ndarray, attribute: AttributeClasses, means: np.ndarray, global_mean: np.ndarray
) -> np.ndarray:
    """`fourth_power_contribution` of every row, vectorised: (n, K + 1)."""
    inside = attribute.labels != LEFT_OUT
    own = np.where(inside, attribute.labels, 0)
    fourth_own = np.linalg.norm(embeddings - means[own], axis=1) ** 4
    fourth_all = np.linalg.norm(embeddings - global_mean, axis=1) ** 4
    rows = np.concatenate([np.eye(attribute.n_classes)[own] * fourth_own[:, None], fourth_all[:, None]], axis=1)
    return rows * inside[:, None]


# Ledoit-Wolf is degenerate below 3 users (at 2 its intensity is exactly 0 and the covariance
# singular): smaller classes stay out of L_AU (they still count in the global Gaussian)
MIN_CLASS_USERS = 3


@dataclass
class AttributeLoss:
    """L_j, its separation term (the class means' part: what a linear reading of the classes sees)
    and its gradients with respect to the class sums and outer-product sums (symmetrised)."""

    value: float
    separation: float
    grad_sums: torch.Tensor  # (K, d)
    grad_outers: torch.Tensor  # (K, d, d)


def attribute_loss(sums: ClassSums, shrinkage: np.ndarray, covariance: bool = True) -> AttributeLoss:
    """L_j = sum_k (n_k/n) KL(N_k || N) and its gradients with respect to the class sums and
    outer-product sums, which every client can compute from the aggregate: the KL's
    closed-form gradients (gaussian.weighted_kl) carried back by hand through the Ledoit-Wolf
    shrinkage and the moments (equal to autograd: test_the_attribute_loss_gradients_equal_autograd).
    With `covariance` False, the gradients of its separation term alone (the class means' part)."""
    counts = torch.tensor(sums.counts, dtype=torch.float64)
    class_sums = torch.tensor(sums.sums, dtype=torch.float64)
    class_outers = torch.tensor(sums.outers, dtype=torch.float64)
    total = counts.sum()
    means, covs = moments(counts, class_sums, class_outers)
    global_mean, global_cov = moments(total, class_sums.sum(0), class_outers.sum(0))
    class_shrinkage, global_shrinkage = torch.tensor(shrinkage[:-1], dtype=torch.float64), float(shrinkage[-1])
    present = counts >= MIN_CLASS_USERS
    kl = weighted_kl(
        counts[present] / total,
        means[present],
        shrink(covs[present], class_shrinkage[present]),
        global_mean,
        shrink(global_cov, global_shrinkage),
        covariance,
    )
    grad_covs = torch.zeros_like(class_outers)  # through the shrinkage (1 - a) C + a tr(C)/d I
    grad_covs[present] = shrink_gradient(kl.grad_s0, class_shrinkage[present])
    grad_global_cov = shrink_gradient(kl.grad_s1, global_shrinkage)
    grad_means = torch.zeros_like(class_sums)  # through the moments C = O/n - m m^T, m = s/n
    grad_means[present] = kl.grad_m0
    grad_means -= 2 * (grad_covs @ means[..., None])[..., 0]
    grad_global_mean = kl.grad_m1 - 2 * grad_global_cov @ global_mean
    grad_sums = grad_means / counts[:, None] + grad_global_mean / total
    grad_outers = grad_covs / counts[:, None, None] + grad_global_cov / total
    # symmetric, so the symmetrised gradient is twice it
    return AttributeLoss(float(kl.value), float(kl.separation), grad_sums, 2 * grad_outers)


def client_attribute_gradient(
    embeddings: torch.Tensor, labels: np.ndarray, grad_sums: torch.Tensor, grad_outers: torch.Tensor
) -> torch.Tensor:
    """Each client's own dL/de = dL/dsum_c + (G_c + G_c^T) e: needs only its class and the aggregate
    (zero for a LEFT_OUT client: its embedding is in no sum)."""
    index = torch.as_tensor(labels)
    out = grad_sums[index.clamp(min=0)] * (index != LEFT_OUT)[:, None]
    for k in torch.unique(index[index != LEFT_OUT]).tolist():  # one product per class, not an (n, d, d) gather
        members = index == k
        out[members] += embeddings[members] @ grad_outers[k].T
    return out


def attribute_gradients(sums: ClassSums, shrinkage: np.ndarray, covariance: bool = True) -> AttributeLoss:
    """`attribute_loss` where a class may have nobody in it (a class list fixed before the clients
    are known): the loss is taken over the non-empty classes; the empty ones get zero gradients."""
    present = sums.counts > 0
    if present.all():
        return attribute_loss(sums, shrinkage, covariance)
    kept = ClassSums(sums.counts[present], sums.sums[present], sums.outers[present])
    loss = attribute_loss(kept, np.append(shrinkage[:-1][present], shrinkage[-1]), covariance)
    index = torch.as_tensor(np.flatnonzero(present))
    grad_sums = torch.zeros((len(present), *loss.grad_sums.shape[1:]), dtype=torch.float64)
    grad_outers = torch.zeros((len(present), *loss.grad_outers.shape[1:]), dtype=torch.float64)
    return replace(
        loss, grad_sums=grad_sums.index_copy(0, index, loss.grad_sums),
        grad_outers=grad_outers.index_copy(0, index, loss.grad_outers),
    )  # fmt: skip


class DataRetention:
    """DD: each client's own training loss on a fresh minibatch of its interactions per step,
    item side frozen; the loss is a sum over clients so each row's gradient is its own. Client i's
    minibatch at step t comes from its own stream (seed, RETENTION, t, client id): a client
    defending alone on its device draws exactly what its row draws here."""

    def __init__(
        self,
        model: SplitModel,
        shared: Arrays,
        positives: list[np.ndarray],
        client_ids: list[str],
        loss: str,
        negatives: int,
        seed: int,
        batch: int = 32,
    ) -> None:
        self.loss, self.negatives, self.batch, self.seed, self.n_items = loss, negatives, batch, seed, model.n_items
        self.keys = sorted(model.init_user(np.random.default_rng(0)))
        # scored in float32, the precision the model is trained and stored in (the attribute loss's
        # covariances stay float64): half the time of float64, gradients within ~1e-6 relative
        rows = {key: torch.tensor(shared[key], dtype=torch.float32) for key in model.row_keys}
        dense = {key: torch.tensor(shared[key], dtype=torch.float32) for key in model.dense_keys(shared)}
        self.positives, self.client_ids = positives, client_ids
        self.score = model.frozen_item_scorer(rows, dense)

    def minibatch(self, client: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Client `client`'s (positives (B,), negatives (B, N)) for `step`."""
        rng = rng_for(self.seed, Stream.RETENTION, step, client_key(self.client_ids[client]))
        positives = self.positives[client]
        return rng.choice(positives, self.batch), sample_negatives(
            rng, self.n_items, np.sort(positives), (self.batch, self.negatives)
        )

    def gradient(self, embeddings: torch.Tensor, step: int) -> torch.Tensor:
        pos, neg = (np.stack(part) for part in zip(*(self.minibatch(i, step) for i in range(len(self.positives)))))
        flat = embeddings.detach().float().requires_grad_(True)
        parts = flat.split(flat.shape[1] // len(self.keys), 1)
        user = dict(zip(self.keys, (part[:, None, :] for part in parts), strict=True))
        pos_score = self.score(user, torch.as_tensor(pos))
        neg_score = self.score(user, torch.as_tensor(neg.reshape(len(pos), -1)))
        neg_score = neg_score.reshape(len(pos), self.batch, self.negatives)
        # every client has the same batch, so the sum of per-client mean losses is n times the overall mean
        total = len(pos) * recommendation_loss(self.loss, pos_score.reshape(-1), neg_score.reshape(-1, self.negatives))
        (grad,) = torch.autograd.grad(total, flat)
        return grad.double()


# One client's side of a step, on its own device: from its own embedding and class and what the
# server broadcast, never anyone else's value.


def client_gradients(
    current: np.ndarray,
    original: np.ndarray,
    labels: Sequence[int],
    gradients: Sequence[AttributeGradient],
    retention: np.ndarray | None = None,
    defending: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(g_AU, g_R) of one client: its attribute gradient from the broadcast `gradients` (one per
    attribute) and its class `labels[j]` in each, and its retention gradient (`retention`, DD: of
    its own training loss; None: DF's 2 (e - e_original)). Zero for a client that does not defend."""
    values = torch.as_tensor(current, dtype=torch.float64)[None]
    grad_au = torch.zeros_like(values)
    for label, (grad_sums, grad_outers) in zip(labels, gradients, strict=True):
        grad_au += client_attribute_gradient(values, np.array([label]), grad_sums, grad_outers) / len(gradients)
    if retention is None:
        grad_r = 2 * (values - torch.as_tensor(original, dtype=torch.float64)[None])
    else:
        grad_r = torch.as_tensor(retention, dtype=torch.float64)[None]
    mask = 1.0 if defending else 0.0
    return (grad_au * mask)[0].numpy(), (grad_r * mask)[0].numpy()


def client_products(grad_au: np.ndarray, grad_r: np.ndarray) -> np.ndarray:
    """What one client adds to the weight's secure sum: (g_R.g_R, g_AU.g_R, g_AU.g_AU)."""
    au, r = torch.as_tensor(grad_au)[None], torch.as_tensor(grad_r)[None]
    return torch.stack([(r * r).sum(1), (au * r).sum(1), (au * au).sum(1)], 1)[0].numpy()


def client_step(
    current: np.ndarray, grad_au: np.ndarray, grad_r: np.ndarray, weight: float, adam: AdamState | None, lr: float
) -> tuple[np.ndarray, AdamState]:
    """One client's Adam step along weight g_AU + (1 - weight) g_R; returns its new embedding and
    Adam state (torch.optim.Adam on the one row, resumed from `adam`)."""
    grad_au_t, grad_r_t = torch.as_tensor(grad_au), torch.as_tensor(grad_r)
    return adam_step(current, (weight * grad_au_t + (1 - weight) * grad_r_t).numpy(), adam, lr)


@dataclass
class ClientCloak:
    """One client's AttrCloak state between the server's messages, kept on its device: its
    embedding before and during the defence, its class per attribute, its Adam moments and the
    gradients of the current step (computed for the weight's sum, used by the step after it)."""

    original: np.ndarray  # (D,) float64
    current: np.ndarray
    labels: list[int]
    defending: bool
    adam: AdamState | None = None
    grad_au: np.ndarray | None = None
    grad_r: np.ndarray | None = None

    @classmethod
    def start(cls, embedding: np.ndarray, labels: list[int], defending: bool) -> ClientCloak:
        original = np.asarray(embedding, dtype=np.float64)
        return cls(original, original.copy(), labels, defending)

    def products(self, gradients: Sequence[AttributeGradient], retention: np.ndarray | None = None) -> np.ndarray:
        self.grad_au, self.grad_r = client_gradients(
            self.current, self.original, self.labels, gradients, retention, self.defending
        )
        return client_products(self.grad_au, self.grad_r)

    def step(self, weight: float, lr: float) -> None:
        if self.grad_au is None or self.grad_r is None:
            raise RuntimeError("an AttrCloak step before this client computed its gradients")
        if self.defending:
            self.current, self.adam = client_step(self.current, self.grad_au, self.grad_r, weight, self.adam, lr)
        self.grad_au = self.grad_r = None


# The server's side: it sees only sums.


class CloakClients(Protocol):
    """The clients as AttrCloak's server sees them: every answer is a sum over clients."""

    def class_sums(self, attribute: int) -> ClassSums:
        """Class sums of attribute `attribute` over the clients' current embeddings."""
        ...

    def fourth_powers(self, attribute: int, means: np.ndarray, global_mean: np.ndarray) -> np.ndarray:
        """The sum of `fourth_power_contribution` over the clients' original embeddings: (K + 1,)."""
        ...

    def null_class_sums(self, attribute: int, keys: Sequence[int], shares: np.ndarray, wanted: int
                        ) -> list[ClassSums]:  # fmt: skip
        """Class sums of the current embeddings of the clients in `attribute`'s sums under their
        pseudo-classes `null_labels(seed, key, ids, shares)` instead of their own classes, for the
        first `wanted` keys whose every pseudo-class is empty or holds MIN_CELL_CLIENTS (cells.py;
        on Flower: one secure sum of all keys' counts, then one of the chosen keys' sums)."""
        ...

    def split_class_sums(self, attribute: int, keys: Sequence[int]) -> list[ClassSums]:
        """For each split key, class sums of the clients' current embeddings under 2K classes: each
        client's own class c of `attribute` and its half h = `half_labels(seed, key, ids)`, as
        class 2c + h; a class with a half under MIN_CELL_CLIENTS is left out of that split (on
        Flower all keys in one secure sum, after one of their counts)."""
        ...

    def products(self, step: int, gradients: list[AttributeGradient]) -> np.ndarray:
        """Each client computes (and keeps) its g_AU and g_R; the sum of `client_products`: (3,)."""
        ...

    def step(self, weight: float) -> None:
        """Each defending client takes its Adam step with this weight."""
        ...


# The null level (defence.cloak_stop = "null"): the separation term of L_j (how far apart the class
# means are) when the classes carry no information, i.e. under public random pseudo-classes with
# the attribute's class shares (mean of NULL_DRAWS draws). Pushing it below that makes the classes
# *more* alike than random subsets are, and an attacker fitted on some users then reads the others
# backwards (docs/PRIVACY.md has the argument and the numbers). A draw with a pseudo-class of one
# or two clients is not summed (cells.py): the next of up to NULL_CANDIDATES keys is taken instead.
NULL_DRAWS = 8
NULL_CANDIDATES = 32
EXTRA_NULL_KEYS = 1_000_000  # where an attribute's keys beyond its first NULL_DRAWS start


def null_keys(attribute: int) -> list[int]:
    """The null level's candidate keys for an attribute: its NULL_DRAWS keys, then the extra ones."""
    first = [attribute * NULL_DRAWS + d for d in range(NULL_DRAWS)]
    start = EXTRA_NULL_KEYS + attribute * NULL_CANDIDATES
    return first + [start + d for d in range(NULL_CANDIDATES - NULL_DRAWS)]


def null_labels(seed: int, key: int, client_ids: Sequence[str], shares: np.ndarray) -> np.ndarray:
    """Each client's pseudo-class for null draw `key`: a pure function of (seed, key, its id) and
    the public class shares, so a client on its own device draws what its row draws in-process."""
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 1 or not np.all(np.isfinite(shares)) or np.any(shares < 0) or abs(shares.sum() - 1) > 1e-6:
        raise ValueError(f"null-level class shares must be finite, non-negative and sum to 1; got {shares.tolist()}")
    uniforms = client_uniforms(seed, Stream.NULL_LABELS, key, list(client_ids))
    return np.minimum(np.searchsorted(np.cumsum(shares), uniforms, side="right"), len(shares) - 1)


def null_separation(clients: CloakClients, attribute: int, counts: np.ndarray, shrinkage: np.ndarray) -> float:
    """The separation term of L_j under random pseudo-classes with the class shares of `counts`,
    averaged over NULL_DRAWS draws (those of `null_keys` with no pseudo-class of one or two
    clients); -inf, said on stderr, when no candidate has none: the attribute never settles."""
    shares = counts / counts.sum()
    draws = clients.null_class_sums(attribute, null_keys(attribute), shares, NULL_DRAWS)
    if not draws:
        print(f"AttrCloak: none of {NULL_CANDIDATES} draws of attribute {attribute}'s null-level pseudo-classes had "
              "three or more clients in each: it does not stop at its null level", file=sys.stderr)  # fmt: skip
        return float("-inf")
    return float(np.mean([attribute_gradients(sums, shrinkage).separation for sums in draws]))


# The covariance term's brake (defence.cloak_stop = "null"): the class covariances' differences
# from the global one, measured in two public random halves of the clients and multiplied entry by
# entry, i.e. what a reading fitted on one half finds in the other (mean of SPLIT_DRAWS splits). It
# is positive while the covariances carry the attribute and falls below zero once pushing them
# together has made them more alike than random subsets are: an attacker then reads the covariance
# structure backwards. The term's gradient stops for good at the first step where it is <= 0.
SPLIT_DRAWS = 8


def half_labels(seed: int, key: int, client_ids: Sequence[str]) -> np.ndarray:
    """Each client's public half (0 or 1) for split `key`: a pure function of (seed, key, its id)."""
    return (client_uniforms(seed, Stream.HALVES, key, list(client_ids)) >= 0.5).astype(np.int64)


def covariance_agreement(sums: ClassSums, global_shrinkage: float) -> float:
    """sum_k (n_k / n) <D_k0, D_k1>_F over the K classes of class sums kept per half (class 2k + h),
    where D_kh is class k's covariance minus the covariance of all of half h, whitened by the
    (shrunk) global covariance. Classes with fewer than MIN_CLASS_USERS in a half count zero (an
    empty half: every class, so 0)."""
    counts, class_sums, outers = sums.counts, sums.sums, sums.outers
    enough = (counts[0::2] >= MIN_CLASS_USERS) & (counts[1::2] >= MIN_CLASS_USERS)
    if not enough.any():
        return 0.0
    n = counts.sum()
    global_mean = class_sums.sum(0) / n
    global_cov = shrink(torch.tensor(outers.sum(0) / n - np.outer(global_mean, global_mean)), global_shrinkage)
    whiten = np.linalg.inv(np.linalg.cholesky(global_cov.numpy()))
    halves = []
    for h in (0, 1):
        mine = slice(h, None, 2)
        size = counts[mine].sum()
        mean = class_sums[mine].sum(0) / size
        half_cov = outers[mine].sum(0) / size - np.outer(mean, mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = class_sums[mine] / counts[mine, None]
            covs = outers[mine] / counts[mine, None, None] - means[:, :, None] * means[:, None, :]
        halves.append(whiten @ (covs - half_cov) @ whiten.T)
    weight = (counts[0::2] + counts[1::2]) / n
    return float((weight[enough] * (halves[0][enough] * halves[1][enough]).sum((1, 2))).sum())


def covariance_pushes(clients: CloakClients, attribute: int, global_shrinkage: float) -> bool:
    """Whether attribute's class covariances still agree across public halves (mean over draws > 0)."""
    keys = [attribute * SPLIT_DRAWS + d for d in range(SPLIT_DRAWS)]
    agreements = [covariance_agreement(sums, global_shrinkage) for sums in clients.split_class_sums(attribute, keys)]
    return float(np.mean(agreements)) > 0


@dataclass
class CloakTrace:
    """What the server knows of an AttrCloak run, per step taken: L_AU, the weight a on the
    attribute loss, and the retention part's share of the step's length (`retention_share`)."""

    losses: list[float]
    weights: list[float]
    retention_shares: list[float]


def cloak(
    clients: CloakClients,
    n_attributes: int,
    variant: str,
    steps: int,
    fixed_weight: float | None = None,
    stop_at_null: bool = False,
    brake_covariance: bool = False,
    unit_balance: bool = False,
    step_done: StepDone = no_progress,
) -> CloakTrace:
    """AttrCloak's server loop. With `stop_at_null` an attribute whose separation term is at or
    below its null level (measured once, before the first step) gives no gradient, and the loop
    ends once every attribute is there; else it runs `steps` steps (the paper). `steps` caps both.
    With `brake_covariance` an attribute's covariance term pushes only until its
    `covariance_agreement` first reaches zero (then its separation alone). The weight is the
    min-norm one on the raw gradients (the paper), on unit ones with `unit_balance`, or fixed."""
    shrinkages, nulls = [], []
    for attribute in range(n_attributes):
        sums = clients.class_sums(attribute)
        shrinkages.append(shrinkage_from(sums, clients.fourth_powers(attribute, *class_means(sums))))
        if stop_at_null:
            nulls.append(null_separation(clients, attribute, sums.counts, shrinkages[-1]))
    covariance = [True] * n_attributes
    losses, weights, shares = [], [], []
    balance = unit_min_norm_weight if unit_balance else min_norm_weight
    for step in range(steps):
        gradients, loss_au, settled = [], 0.0, 0
        for attribute, shrinkage in enumerate(shrinkages):
            if brake_covariance and covariance[attribute]:
                covariance[attribute] = covariance_pushes(clients, attribute, float(shrinkage[-1]))
            loss = attribute_gradients(clients.class_sums(attribute), shrinkage, covariance[attribute])
            if nulls and loss.separation <= nulls[attribute]:  # the means no further apart than random classes'
                settled += 1
                gradients.append((torch.zeros_like(loss.grad_sums), torch.zeros_like(loss.grad_outers)))
            else:
                gradients.append((loss.grad_sums, loss.grad_outers))
            loss_au += loss.value / n_attributes
        if settled == n_attributes:
            break
        rr, ar, aa = clients.products(step, gradients)
        weight = balance(rr, ar, aa, 0.0 if variant == "dd" else 0.1) if fixed_weight is None else fixed_weight
        clients.step(weight)
        losses.append(loss_au)
        weights.append(weight)
        shares.append(retention_share(rr, aa, weight))
        step_done()
    return CloakTrace(losses, weights, shares)


@dataclass
class PseudoClasses:
    """Who the clients are, for their public pseudo-classes (`null_labels`): the run's seed and
    each row's client id."""

    seed: int
    client_ids: list[str]


class MatrixClients:
    """In-process: all clients as the rows of one matrix, the per-client work vectorised."""

    def __init__(
        self,
        embeddings: np.ndarray,
        attributes: list[AttributeClasses],
        variant: str,
        lr: float,
        defending: np.ndarray,
        retention: DataRetention | None,
        aggregator: Aggregator,
        pseudo: PseudoClasses | None = None,
    ) -> None:
        self.embeddings, self.attributes, self.variant = embeddings, attributes, variant
        self.retention, self.aggregator, self.pseudo = retention, aggregator, pseudo
        self.original = torch.tensor(embeddings, dtype=torch.float64)
        self.current = self.original.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.current], lr=lr)
        self.mask = torch.as_tensor(moving(defending, attributes), dtype=torch.float64)[:, None]
        self.grad_au = self.grad_r = torch.zeros_like(self.original)

    def class_sums(self, attribute: int) -> ClassSums:
        return self.aggregator.class_sums(self.current.detach().numpy(), self.attributes[attribute])

    def fourth_powers(self, attribute: int, means: np.ndarray, global_mean: np.ndarray) -> np.ndarray:
        return self.aggregator.total(fourth_powers(self.embeddings, self.attributes[attribute], means, global_mean))

    def null_class_sums(self, attribute: int, keys: Sequence[int], shares: np.ndarray, wanted: int
                        ) -> list[ClassSums]:  # fmt: skip
        if self.pseudo is None:
            raise ValueError("the null level needs the clients' ids and the seed of their pseudo-classes")
        inside = self.attributes[attribute].labels != LEFT_OUT
        cells = [np.where(inside, null_labels(self.pseudo.seed, key, self.pseudo.client_ids, shares), LEFT_OUT)
                 for key in keys]  # fmt: skip
        clean = [labels for labels in cells if clean_draw(cell_counts(labels, len(shares)))][:wanted]
        return self._cell_sums("null", clean, len(shares))

    def split_class_sums(self, attribute: int, keys: Sequence[int]) -> list[ClassSums]:
        if self.pseudo is None:
            raise ValueError("the covariance brake needs the clients' ids and the seed of their halves")
        own, n_cells = self.attributes[attribute], 2 * self.attributes[attribute].n_classes
        cells = [np.where(own.labels != LEFT_OUT, 2 * own.labels + half_labels(self.pseudo.seed, key,
                          self.pseudo.client_ids), LEFT_OUT) for key in keys]  # fmt: skip
        kept = [np.where(kept_halves(cell_counts(labels, n_cells))[np.maximum(labels, 0)], labels, LEFT_OUT)
                for labels in cells]  # fmt: skip
        return self._cell_sums("split", kept, n_cells)

    def _cell_sums(self, kind: str, cells: list[np.ndarray], n_cells: int) -> list[ClassSums]:
        current = self.current.detach().numpy()
        return [self.aggregator.class_sums(current, AttributeClasses(kind, labels, n_cells)) for labels in cells]

    def products(self, step: int, gradients: list[AttributeGradient]) -> np.ndarray:
        values = self.current.detach()
        grad_au = torch.zeros_like(values)
        for attribute, (grad_sums, grad_outers) in zip(self.attributes, gradients, strict=True):
            grad_au += client_attribute_gradient(values, attribute.labels, grad_sums, grad_outers) / len(gradients)
        if self.variant == "dd":
            assert self.retention is not None
            grad_r = self.retention.gradient(values, step)
        else:
            grad_r = 2 * (values - self.original)
        self.grad_au, self.grad_r = grad_au * self.mask, grad_r * self.mask
        au, r = self.grad_au, self.grad_r
        return self.aggregator.total(torch.stack([(r * r).sum(1), (au * r).sum(1), (au * au).sum(1)], 1).numpy())

    def step(self, weight: float) -> None:
        self.optimizer.zero_grad()
        self.current.grad = weight * self.grad_au + (1 - weight) * self.grad_r
        self.optimizer.step()


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
    null: PseudoClasses | None = None,
    brake_covariance: bool = False,
    unit_balance: bool = False,
    step_done: StepDone = no_progress,
) -> DefenceOutcome:
    """Run AttrCloak-DD (`variant="dd"`, needs `retention`) or -DF for `steps` steps, or with `null`
    until every attribute's loss is at its null level (`cloak`, at most `steps`; `brake_covariance`:
    the covariance term only until its halves disagree); only the clients
    with `defending[i]` move (everyone contributes to the class sums). The weight on the attribute
    loss is the closed-form min-norm one at every step (of the unit-length gradients with
    `unit_balance`), or `fixed_weight` if given."""
    started = time.perf_counter()
    if variant == "dd" and retention is None:
        raise ValueError("AttrCloak-DD needs the clients' retention loss (a DataRetention)")
    if len(defending) != len(embeddings):
        raise ValueError(f"defending has {len(defending)} flags for {len(embeddings)} clients' embeddings")
    if not np.all(np.isfinite(embeddings)):
        raise FedUnlearnError("AttrCloak: some user embeddings are not finite (NaN or inf); the model diverged")
    aggregator = aggregator or PlainSum()
    clients = MatrixClients(embeddings, attributes, variant, lr, defending, retention, aggregator, null)
    trace = cloak(
        clients, len(attributes), variant, steps, fixed_weight, stop_at_null=null is not None,
        brake_covariance=brake_covariance, unit_balance=unit_balance, step_done=step_done,
    )  # fmt: skip
    return DefenceOutcome(clients.current.detach().numpy(), trace.losses, trace.weights, time.perf_counter() - started,
                          trace.retention_shares)  # fmt: skip
