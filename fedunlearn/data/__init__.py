"""Datasets: loading by name, implicit-feedback filtering, and the user filter leave-one-out needs."""

from __future__ import annotations

from typing import Any

from fedunlearn.data.dataset import Dataset, drop_users_with_fewer_than, keep_ratings_at_least
from fedunlearn.errors import FedUnlearnError

DATASETS = ("synthetic", "ml-100k", "ml-1m", "csv")
MIN_INTERACTIONS = 3  # leave-one-out: at least one training, one validation and one test item

__all__ = ["DATASETS", "Dataset", "load_dataset"]


def load_dataset(
    name: str,
    *,
    path: str = "",
    users_path: str = "",
    min_rating: float = 0.0,
    synthetic: dict[str, Any] | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name, keep ratings >= min_rating, and drop users left with fewer than 3 interactions."""
    if name == "synthetic":
        from fedunlearn.data.synthetic import generate

        ds = generate(**(synthetic or {}), seed=seed)
    elif name in ("ml-100k", "ml-1m"):
        from fedunlearn.data.movielens import load_movielens

        ds = load_movielens(name)
    elif name == "csv":
        if not path:
            raise FedUnlearnError("the csv dataset needs an interactions file: set data.path (or --path)")
        from fedunlearn.data.csv_loader import load_csv

        ds = load_csv(path, users_path or None)
    else:
        raise FedUnlearnError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    ds, _ = drop_users_with_fewer_than(keep_ratings_at_least(ds, min_rating), MIN_INTERACTIONS)
    if ds.n_users == 0:
        raise FedUnlearnError(
            f"no user of {name} has {MIN_INTERACTIONS} or more interactions rated >= {min_rating}: "
            "lower data.min_rating or add data"
        )
    return ds
