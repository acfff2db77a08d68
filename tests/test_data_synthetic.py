"""The built-in synthetic dataset: shape, determinism, and attributes that behaviour leaks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from fedunlearn.data import load_dataset
from fedunlearn.data.dataset import Dataset
from fedunlearn.data.movielens import AGE_GROUPS
from fedunlearn.data.split import leave_one_out
from fedunlearn.data.synthetic import ATTRIBUTES, _ratings, generate
from fedunlearn.errors import FedUnlearnError


def arrays(ds: Dataset) -> list[np.ndarray]:
    return [ds.user_ids, ds.item_ids, ds.users, ds.items, ds.ratings, ds.timestamps]


def test_deterministic_per_seed() -> None:
    first, again, other = generate(seed=3), generate(seed=3), generate(seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(first), arrays(again)))
    assert first.attributes.equals(again.attributes)
    assert not np.array_equal(first.items, other.items)


def test_shape_and_invariants() -> None:
    ds = generate(n_users=500, n_items=300, interactions_per_user=20, seed=1)
    assert ds.name == "synthetic" and ds.n_users == 500 and ds.user_ids.tolist() == list(range(500))
    assert ds.n_items <= 300 and np.all(np.diff(ds.item_ids) > 0)
    counts = np.bincount(ds.users, minlength=500)
    assert counts.min() >= 5 and counts.max() <= 150
    assert 17 <= counts.mean() <= 23
    assert len(np.unique(ds.users * ds.n_items + ds.items)) == ds.n_interactions  # no repeated pair
    assert set(np.unique(ds.ratings)) <= {1, 2, 3, 4, 5} and 3.2 <= ds.ratings.mean() <= 3.9
    by_user = np.argsort(ds.users, kind="stable")
    same_user = np.diff(ds.users[by_user]) == 0
    assert np.all(np.diff(ds.timestamps[by_user])[same_user] > 0)  # increasing in row order
    assert list(ds.attributes.columns) == list(ATTRIBUTES)
    for name, values in ATTRIBUTES.items():
        assert set(ds.attributes[name]) <= set(values)
    assert tuple(ATTRIBUTES["age"]) == AGE_GROUPS  # the same labels as the MovieLens loaders
    assert len(ATTRIBUTES["occupation"]) == 21
    assert 0.62 <= (ds.attributes["gender"] == "M").mean() <= 0.78


def test_ratings_rise_with_affinity() -> None:
    affinity = np.linspace(-3.0, 3.0, 1000)
    ratings = _ratings(affinity, np.zeros(1000, dtype=np.int64), np.random.default_rng(0))
    assert ratings[-100:].mean() > ratings[:100].mean() + 2.0
    assert 3.3 <= ratings.mean() <= 3.8


def attack(strength: float) -> float:
    """Balanced accuracy of predicting gender from which items a held-out user interacted with."""
    ds = generate(n_users=1000, n_items=300, interactions_per_user=30, strength=strength, seed=0)
    matrix = np.zeros((ds.n_users, ds.n_items), dtype=np.float32)
    matrix[ds.users, ds.items] = 1.0
    gender = (ds.attributes["gender"] == "F").to_numpy()
    x_train, x_test, y_train, y_test = train_test_split(matrix, gender, test_size=0.3, stratify=gender, random_state=0)
    model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(x_train, y_train)
    return balanced_accuracy_score(y_test, model.predict(x_test))


def test_behaviour_leaks_gender_in_proportion_to_strength() -> None:
    assert attack(1.0) >= 0.65
    assert abs(attack(0.0) - 0.5) < 0.1


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"n_items": 100, "interactions_per_user": 51}, "between 3 and half of data.synthetic_items"),
        ({"interactions_per_user": 2}, "between 3 and half"),
        ({"n_items": 9}, "at least 10 items"),
        ({"n_users": 0}, "at least 1 user"),
        ({"strength": -1.0}, "must be >= 0"),
    ],
)
def test_invalid_parameters(kwargs: dict, problem: str) -> None:
    with pytest.raises(FedUnlearnError, match=problem):
        generate(**kwargs)


def test_load_dataset_passes_parameters_and_seed() -> None:
    params = {"n_users": 50, "n_items": 60, "interactions_per_user": 10}
    ds = load_dataset("synthetic", synthetic=params, seed=7)
    assert ds.n_users == 50 and np.array_equal(ds.items, generate(50, 60, 10, seed=7).items)
    rated = load_dataset("synthetic", synthetic=params, min_rating=5)
    assert rated.ratings.min() == 5 and np.bincount(rated.users).min() >= 3


@pytest.mark.slow
def test_scales_to_100k_users() -> None:  # time and memory at this size: benchmarks/engines.py
    ds = generate(n_users=100_000, n_items=2000, interactions_per_user=30)
    split = leave_one_out(ds)
    assert ds.n_users == 100_000 and split.test_negatives.shape == (100_000, 99)
