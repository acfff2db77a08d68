"""The popularity ranker: items ordered by how many users trained on them."""

from __future__ import annotations

import numpy as np

from fedunlearn.config import Config
from fedunlearn.fl.client import rank_held_out
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.rounds import FederationResult, evaluation_metrics
from fedunlearn.seeding import Stream, rng_for


def rank_by_popularity(config: Config, federation: Federation) -> FederationResult:
    split = federation.split
    counts = np.bincount(split.train_items, minlength=federation.n_items).astype(np.float64)
    # a seeded jitter below 1 breaks ties between equally popular items without reordering others
    scores = counts + rng_for(config.run.seed, Stream.POPULARITY).uniform(0, 0.5, federation.n_items)
    evaluations = [
        rank_held_out(federation.client(u), lambda items: scores[items], config.eval.full_ranking)
        for u in range(federation.n_clients)
    ]
    row = {"round": 0, **evaluation_metrics(evaluations, config.eval.ks, config.eval.full_ranking)}
    return FederationResult(rounds=[row], final=dict(row))
