"""HR@K and NDCG@K for leave-one-out ranking (one relevant item per user)."""

from __future__ import annotations

import numpy as np


def rank_of_target(target_score: float, other_scores: np.ndarray) -> int:
    """0-based rank of the target among the others; ties count against the target (pessimistic),
    so a model that scores everything equally gets no credit. A non-finite score can never help
    the target: a non-finite target is ranked last, and every other item not strictly below it (a
    NaN included: every comparison with NaN is False) counts against it."""
    if not np.isfinite(target_score):
        return len(other_scores)
    return int(np.count_nonzero(~(other_scores < target_score)))


def hit_ratio(ranks: np.ndarray, k: int) -> float:
    """Share of users whose target is in the top k."""
    return float(np.mean(np.asarray(ranks) < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean of 1/log2(rank + 2) over users whose target is in the top k (0 for the others)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def ranking_metrics(ranks: np.ndarray, ks: list[int], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}HR@{k}"] = hit_ratio(ranks, k)
    for k in ks:
        out[f"{prefix}NDCG@{k}"] = ndcg(ranks, k)
    return out
