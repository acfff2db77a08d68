"""The reply search the message tests use (helpers.assert_vectors_absent) finds derived copies of a
secret vector, not only exact ones: scaled, sign-flipped, noisy, laid out along a column."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from helpers import assert_vectors_absent, copy_threshold

DIM = 32


def _reply(array):
    return RecordDict({"update": ArrayRecord({"x": Array(np.asarray(array, np.float32))})})


@pytest.fixture
def secret():
    return np.random.default_rng(0).standard_normal((1, DIM))


@pytest.mark.parametrize(
    "derive",
    [
        lambda u, rng: u,  # the copy itself
        lambda u, rng: -3.5 * u,  # scaled and flipped
        lambda u, rng: u + 0.3 * np.linalg.norm(u) / np.sqrt(DIM) * rng.standard_normal(u.shape),  # cosine ~0.96
        lambda u, rng: np.concatenate([rng.standard_normal(5), 0.01 * u[0], rng.standard_normal(7)]),  # inside noise
        lambda u, rng: np.column_stack([rng.standard_normal(DIM), 2 * u[0], rng.standard_normal(DIM)]),  # a column
    ],
    ids=["exact", "scaled-flipped", "noisy", "embedded", "column"],
)
def test_a_derived_copy_is_found(secret, derive):
    with pytest.raises(AssertionError, match="copy of a secret vector"):
        assert_vectors_absent(_reply(derive(secret, np.random.default_rng(1))), secret)


def test_unrelated_values_pass(secret):
    rng = np.random.default_rng(2)
    assert_vectors_absent(_reply(rng.standard_normal((50, DIM))), secret)  # 50 x 32 windows of noise
    assert_vectors_absent(_reply(rng.integers(0, 2**31, size=2000)), secret)  # SecAgg+-like masked values


def test_the_threshold_is_0_9_where_chance_cannot_reach_it():
    assert copy_threshold(32) == 0.9 and copy_threshold(64) == 0.9
    assert 0.99 < copy_threshold(8) < 1  # 8 values: a random direction passes 0.9 about once in 1e3
