"""Secure sums through Flower's SecAgg+: the same numbers as plain sums, and no reply carries a secret.

One simulation for the whole module: 6 clients train 2 rounds through Flower, then the server asks
for AttrCloak's class sums and for a local audit, both over a subset of the clients. The in-process
runner with the same seed holds the same user parts, so the plain sums come from it."""

import time

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from helpers import TINY, run_as_the_runner_does, simulate_then

from fedunlearn.config import load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.privacy.attacks import train_attacker
from fedunlearn.privacy.audit import local_outcome
from fedunlearn.privacy.common import class_contribution, flatten_users
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from server.privacy_queries import CLASS_SUMS_BOUND
from server.secure_sum import MODULUS, quantization_range, resolution

pytestmark = [pytest.mark.flower, pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]

SMALL = TINY + ["data.synthetic_users=6", "train.rounds=2", "eval.every=2", "train.fraction=1", "run.engine=flower"]
CLIENTS = [0, 1, 2, 4, 5]  # a subset, so the index -> node mapping matters
SUMMED = "age"  # class sums: 5 classes among the 6 users
AUDITED = "gender"  # local audit: M and F
PROTOCOL_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}
PROTOCOL_KEYS |= {Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}
FITRES = ("parameters", "metrics", "status", "num_examples")


@pytest.fixture(scope="module")
def run():
    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    pool = InProcessPool(config, federation)
    expected = run_as_the_runner_does(federated_server(config, federation, pool, Progress(1, False)), pool)
    embeddings = flatten_users(pool.model, [pool.user(i) for i in range(federation.n_clients)])
    attributes = federation.dataset.attributes.astype(str)
    attacker = train_attacker("mlp", AUDITED, embeddings, attributes[AUDITED].to_numpy(), config.run.seed)

    def after_training(result, flower_pool):
        seen = flower_pool.replies_seen
        with pytest.raises(RuntimeError, match="outside the secure sum's bound") as too_tight:
            flower_pool.class_sums(SUMMED, CLIENTS, bound=1e-3)  # refused by the clients, not clipped
        trained, start = len(seen), time.perf_counter()
        sums = flower_pool.class_sums(SUMMED, CLIENTS)
        middle, class_seconds = len(seen), time.perf_counter() - start
        outcome = flower_pool.local_audit(attacker, CLIENTS)
        audit_seconds = time.perf_counter() - start - class_seconds
        print(f"secure sums over {len(CLIENTS)} clients: {class_seconds:.2f} s, {audit_seconds:.2f} s")
        replies = {"class_replies": seen[trained:middle], "audit_replies": seen[middle:]}
        return {"result": result, "sums": sums, "outcome": outcome, "too_tight": str(too_tight.value)} | replies

    flower = simulate_then(config, federation.n_clients, after_training)
    return flower | {"expected": expected, "embeddings": embeddings, "attributes": attributes, "attacker": attacker}


def test_flower_training_left_the_same_user_parts_as_the_inprocess_runner(run):
    for key, value in run["expected"].shared.items():
        np.testing.assert_array_equal(run["result"].shared[key], value)


def test_secure_class_sums_equal_the_plain_class_sums(run):
    column = run["attributes"][SUMMED].to_numpy()
    classes = np.unique(column)
    plain = ClassSums.of(run["embeddings"][CLIENTS], np.searchsorted(classes, column[CLIENTS]), len(classes))
    secure = run["sums"]
    np.testing.assert_array_equal(secure.counts, plain.counts)
    tolerance = len(CLIENTS) * resolution(len(CLIENTS), CLASS_SUMS_BOUND)
    assert tolerance < 1e-5
    np.testing.assert_allclose(secure.sums, plain.sums, rtol=0, atol=tolerance)
    np.testing.assert_allclose(secure.outers, plain.outers, rtol=0, atol=tolerance)
    assert np.abs(plain.sums).max() > 100 * tolerance  # the comparison is not between near-zeros


def test_a_value_beyond_the_bound_fails_the_sum_loudly_and_the_next_sum_still_works(run):
    assert f"secure sum over {len(CLIENTS)} clients failed" in run["too_tight"]
    assert run["sums"].counts.sum() == len(CLIENTS)  # the rounds after it ran in full


def test_secure_local_audit_equals_the_plain_sum_of_local_outcomes(run):
    values = run["attributes"][AUDITED].to_numpy()
    plain = sum(local_outcome(run["attacker"], run["embeddings"][i], values[i]) for i in CLIENTS)
    np.testing.assert_array_equal(run["outcome"], plain)
    k = len(run["attacker"].classes)
    assert run["outcome"][k : 2 * k].sum() == len(CLIENTS)  # one true class per client


@pytest.mark.parametrize("round_name", ["audit_replies", "class_replies"])
def test_no_reply_carries_an_embedding_or_an_attribute_only_masked_vectors(run, round_name):
    replies = run[round_name]
    embeddings = run["embeddings"]
    secret_bytes = [e.astype(dtype).tobytes() for e in embeddings for dtype in (np.float32, np.float64)]
    attribute_values = set(run["attributes"].iloc[CLIENTS].to_numpy().ravel())
    if round_name == "audit_replies":
        plain = [local_outcome(run["attacker"], embeddings[i], run["attributes"][AUDITED][i]) for i in CLIENTS]
    else:
        classes = list(np.unique(run["attributes"][SUMMED]))
        labels = [classes.index(run["attributes"][SUMMED][i]) for i in CLIENTS]
        plain = [class_contribution(embeddings[i], label, len(classes)) for i, label in zip(CLIENTS, labels)]

    assert len(replies) == 4 * len(CLIENTS)  # setup, share keys, masked vector, unmask
    masked = []
    for content in replies:
        assert set(content.keys()) <= {RECORD_KEY_CONFIGS, *(f"fitres.{key}" for key in FITRES)}
        assert all(len(record) == 0 for record in content.array_records.values())  # the mod emptied fitres.parameters
        for record in content.metric_records.values():
            assert dict(record) == {"num_examples": 1}
        if "fitres.metrics" in content:
            assert len(content.config_records["fitres.metrics"]) == 0
        protocol = content.config_records[RECORD_KEY_CONFIGS]
        assert set(protocol.keys()) <= PROTOCOL_KEYS
        for record in content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    assert not (isinstance(item, str) and item in attribute_values)
                    assert not (isinstance(item, bytes) and any(secret in item for secret in secret_bytes))
        if Key.MASKED_PARAMETERS in protocol:
            masked.append([bytes_to_ndarray(blob) for blob in protocol[Key.MASKED_PARAMETERS]])

    assert len(masked) == len(CLIENTS)  # each client's only contribution
    for factor, vector in masked:
        assert factor.shape == (1,) and vector.shape == plain[0].shape
        assert np.issubdtype(vector.dtype, np.integer) and vector.min() >= 0 and vector.max() < MODULUS
        assert vector.max() > quantization_range(len(CLIENTS))  # masked, not merely quantised (<= Q)
        assert not any(np.allclose(vector, p) for p in plain)
        windows = np.lib.stride_tricks.sliding_window_view(vector.astype(np.float64), embeddings.shape[1])
        assert not any(np.any(np.all(np.isclose(windows, e), axis=-1)) for e in embeddings)
