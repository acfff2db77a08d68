"""The popularity ranker: items ordered by how many of the clients trained on them."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from fedunlearn.config import Config
from fedunlearn.fl.client import rank_held_out
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.rounds import FederationResult, evaluation_metrics


def rank_by_popularity(config: Config, federation: Federation, left: Collection[str] = ()) -> FederationResult:
    """Counted over, and scored on, the clients in the federation: not those excluded
    (data.exclude_clients) nor those that `left` (a run's drop events), so the reference covers the
    users and data a run's own HR@10 does. Equally popular items tie, and ties count against the
    held-out item, as for every model (metrics.rank_of_target)."""
    gone = set(left)
    clients = [i for i in federation.kept(config.data.exclude_clients) if federation.client_ids[i] not in gone]
    _, items = federation.split.pairs_of(clients)
    counts = np.bincount(items, minlength=federation.n_items).astype(np.float64)
    evaluations = [rank_held_out(federation.client(u), lambda items: counts[items], config.eval.full_ranking)
                   for u in clients]  # fmt: skip
    row = {"round": 0, **evaluation_metrics(evaluations, config.eval.ks, config.eval.full_ranking)}
    return FederationResult(rounds=[row], final=dict(row))
