"""Leave-one-out split: held-out items, training CSR, and test negatives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedunlearn.data.dataset import Dataset, from_frame
from fedunlearn.data.split import leave_one_out
from fedunlearn.data.synthetic import generate
from fedunlearn.errors import FedUnlearnError


def frame(rows: list[tuple[str, int, int]]) -> Dataset:
    data = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).assign(rating=1.0)
    return from_frame("hand", data, pd.DataFrame(index=pd.Index([], dtype=object)))


def test_latest_by_timestamp_ties_by_row_order() -> None:
    ds = frame(
        [
            ("a", 10, 5),
            ("b", 11, 2),
            ("a", 11, 1),
            ("a", 12, 5),  # a: 12 ties with 10 but comes later
            ("a", 13, 3),
            ("b", 12, 9),
            ("b", 14, 3),
            ("b", 10, 1),
        ]
    )
    split = leave_one_out(ds, num_negatives=0)
    item = ds.item_ids
    a, b = ds.user_ids.tolist().index("a"), ds.user_ids.tolist().index("b")
    assert (item[split.test_item[a]], item[split.valid_item[a]]) == (12, 10)
    assert item[split.train_of(a)].tolist() == [11, 13]
    assert (item[split.test_item[b]], item[split.valid_item[b]]) == (12, 14)
    assert item[split.train_of(b)].tolist() == [10, 11]
    assert item[split.positives_of(b)].tolist() == [10, 11, 12, 14]
    assert split.train_indptr.tolist() == [0, 2, 4]


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    return generate(n_users=300, n_items=200, interactions_per_user=30, seed=5)


def test_held_out_items_are_not_trained_on(synthetic: Dataset) -> None:
    split = leave_one_out(synthetic, num_negatives=50, seed=1)
    counts = np.bincount(synthetic.users, minlength=synthetic.n_users)
    assert np.array_equal(np.diff(split.train_indptr), counts - 2)
    for u in range(split.n_users):
        train = split.train_of(u)
        assert np.all(np.diff(train) > 0)  # sorted, unique
        assert split.test_item[u] not in train and split.valid_item[u] not in train
        assert split.test_item[u] != split.valid_item[u]
        mine = synthetic.timestamps[synthetic.users == u]
        latest = synthetic.items[synthetic.users == u][np.argmax(mine)]
        assert split.test_item[u] == latest


def test_negatives_are_distinct_unseen_and_seeded(synthetic: Dataset) -> None:
    split = leave_one_out(synthetic, num_negatives=50, seed=1)
    assert split.test_negatives.shape == (synthetic.n_users, 50)
    assert split.test_negatives.dtype == np.int64
    for u in range(split.n_users):
        negatives = split.test_negatives[u]
        assert len(np.unique(negatives)) == 50
        assert not np.isin(negatives, split.positives_of(u)).any()
        assert negatives.min() >= 0 and negatives.max() < split.n_items
    same = leave_one_out(synthetic, num_negatives=50, seed=1)
    other = leave_one_out(synthetic, num_negatives=50, seed=2)
    assert np.array_equal(same.test_negatives, split.test_negatives)
    assert not np.array_equal(other.test_negatives, split.test_negatives)
    assert np.array_equal(other.test_item, split.test_item)


def test_negatives_spread_over_all_unseen_items(synthetic: Dataset) -> None:
    """Uniform sampling: no unseen item is systematically avoided or favoured."""
    split = leave_one_out(synthetic, num_negatives=50, seed=0)
    hits = np.bincount(split.test_negatives.ravel(), minlength=split.n_items)
    seen = np.zeros((split.n_users, split.n_items), dtype=bool)
    seen[synthetic.users, synthetic.items] = True
    chance = 50 / (split.n_items - seen.sum(axis=1))  # each unseen item's chance per user
    expected = (~seen * chance[:, None]).sum(axis=0)
    assert np.all(np.abs(hits - expected) < 5 * np.sqrt(expected) + 3)


def test_user_with_almost_every_item_gets_exactly_the_rest() -> None:
    rows = [("full", item, item) for item in range(195)] + [("light", item, item) for item in range(195, 200)]
    split = leave_one_out(frame(rows), num_negatives=5, seed=0)
    assert sorted(split.test_negatives[0].tolist()) == [195, 196, 197, 198, 199]
    assert not np.isin(split.test_negatives[1], [195, 196, 197, 198, 199]).any()


def test_too_many_negatives_names_user_and_fix() -> None:
    rows = [("full", item, item) for item in range(8)] + [("light", item, item) for item in range(3)]
    with pytest.raises(FedUnlearnError, match="user full has only 0 items left to sample 1 test negatives"):
        leave_one_out(frame(rows), num_negatives=1)
    rows = [("a", item, item) for item in range(4)] + [("b", item, item) for item in range(4, 7)]
    with pytest.raises(FedUnlearnError, match="user a has only 3 items .* lower data.test_negatives to at most 3"):
        leave_one_out(frame(rows), num_negatives=4)
    assert sorted(leave_one_out(frame(rows), num_negatives=3).test_negatives[0].tolist()) == [4, 5, 6]


def test_users_need_three_interactions() -> None:
    with pytest.raises(FedUnlearnError, match=r"user b has 2 interaction\(s\) .*drop_users_with_fewer_than"):
        leave_one_out(frame([("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 1, 1), ("b", 2, 2)]))
