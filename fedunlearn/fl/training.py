"""Pieces shared by federated and centralized training: negative sampling and the losses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedunlearn.config import TrainConfig


def sample_negatives(
    rng: np.random.Generator, n_items: int, positives: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Items drawn uniformly from those not in `positives` (sorted), by rejection."""
    if len(positives) >= n_items:
        raise ValueError("a user with every item as a positive has no negatives")
    is_positive = np.zeros(n_items, dtype=bool)
    is_positive[positives] = True
    out = rng.integers(0, n_items, size=shape)
    flat = out.reshape(-1)
    bad = np.flatnonzero(is_positive[flat])
    while len(bad):  # redraw only the rejected, in order (the draws of a full-array recheck, found faster)
        flat[bad] = rng.integers(0, n_items, size=len(bad))
        bad = bad[is_positive[flat[bad]]]
    return out


def informative_pool(user: np.ndarray, items: np.ndarray, positives: np.ndarray, share: float) -> np.ndarray:
    """FRU's candidate pool: the top `share` of items by score with the user's embedding, plus the
    top `share` nearest (dot product) to the centroid of the user's positive items; positives out."""
    k = max(1, int(share * len(items)))
    by_user = np.argpartition(-(items @ user), k - 1)[:k]
    by_centroid = np.argpartition(-(items @ items[positives].mean(axis=0)), k - 1)[:k]
    return np.setdiff1d(np.union1d(by_user, by_centroid), positives)


def sample_informative_negatives(
    rng: np.random.Generator, n_items: int, positives: np.ndarray, shape: tuple[int, ...], pool: np.ndarray, beta: float
) -> np.ndarray:
    """Uniform negatives, of which a `beta` share per positive is replaced by random (not the
    hardest) draws from the informative pool, less every positive (an attacker's promoted target
    and trained pseudo-items are positives too, though not among the items the pool was built from)."""
    out = sample_negatives(rng, n_items, positives, shape)
    informative = round(beta * shape[-1])
    pool = np.setdiff1d(pool, positives)
    if informative and len(pool):
        out[..., :informative] = rng.choice(pool, size=(*shape[:-1], informative))
    return out


def recommendation_loss(loss: str, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """BPR or BCE over B positives (B,) and their sampled negatives (B, n), averaged."""
    if loss == "bpr":
        return -F.logsigmoid(positive.unsqueeze(-1) - negative).mean()
    pos_loss = F.softplus(-positive).sum()
    neg_loss = F.softplus(negative).sum()
    return (pos_loss + neg_loss) / (positive.numel() + negative.numel())


def make_optimizer(train: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr)
    return torch.optim.SGD(params, lr=train.lr)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from fedunlearn.errors import FedUnlearnError

        raise FedUnlearnError("run.device = 'cuda' but no CUDA device is visible: use auto or cpu")
    return torch.device(device)
