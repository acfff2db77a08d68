"""AttrCloak through Flower messages: each client defends its own embedding, the server sees sums.

One simulation for the module: 8 clients train 2 rounds through Flower, then 7 of them run
AttrCloak-DF and after it AttrCloak-DD (3 steps each, 5 of the 7 defending) through
server.defence.flower_attrcloak. The auditor's query (query.audit_users, the simulation's oracle)
reads the clients' user parts back after each defence; the in-process `attrcloak` on the same
embeddings is the reference. D2D-R and U2U-R, and clients deciding alone whether they defend:
tests/test_flower_regularised.py.

Tolerance: the server's inputs differ from the plain sums only by SecAgg+'s rounding, at most
n * resolution(n, bound) per summed value (n = 7: 6.7e-6 for the class sums, bound 128; 3.3e-6 for
the products, bound 64; relative 2n/Q ~ 5e-8 for the fourth powers). Three steps of Gaussian fits,
KL gradients, the min-norm weight and Adam (whose first step is lr * sign(g)) carry that on: we ask
for the same weights and losses to 1e-4 (relative) and the same embeddings to 1e-4 (absolute),
against moves of order 0.1 per client."""

import time

import numpy as np
import pytest
from helpers import TINY, assert_no_secret_in, run_as_the_runner_does, simulate_then

from fedunlearn.config import load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.privacy.attrcloak import DataRetention, attrcloak, half_labels, null_labels
from fedunlearn.privacy.common import flatten_users
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from server.privacy_queries import CLASS_SUMS_BOUND, PRODUCTS_BOUND
from server.secure_sum import resolution

pytestmark = [pytest.mark.flower]

SMALL = TINY + ["data.synthetic_users=8", "train.rounds=2", "eval.every=2", "train.fraction=1", "run.engine=flower"]
CLIENTS = [0, 1, 2, 3, 5, 6, 7]  # a subset, so the index -> node mapping matters
DEFENDING = [True, True, False, True, True, True, False]
ATTRIBUTES = ["gender", "age"]
STEPS, LR = 3, 0.05
NULL_KEY, NULL_SHARES = 5, np.array([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])  # age has six classes among CLIENTS
SPLIT_KEYS = [3, 4, 9]


def _read_users(pool, model):
    return flatten_users(model, pool.audit_users(CLIENTS))


@pytest.fixture(scope="module")
def run():
    from server.defence import FlowerCloakClients, flower_attrcloak, on_clients

    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    attributes = federation.dataset.attributes.astype(str)
    classes = [sorted(set(attributes[name].iloc[CLIENTS])) for name in ATTRIBUTES]

    def after_training(result, pool):
        from fedunlearn.models import build_model

        model = build_model(config.model, federation.n_items)
        seen, out = pool.replies_seen, {"result": result}
        out["trained"] = _read_users(pool, model)
        for variant in ("df", "dd"):
            start, began = len(seen), time.perf_counter()
            shared = result.shared if variant == "dd" else None
            on = on_clients(pool, CLIENTS, ATTRIBUTES, DEFENDING, classes, shared)
            outcome = flower_attrcloak(on, variant, STEPS, LR)
            print(f"AttrCloak-{variant.upper()} through Flower, {STEPS} steps: {time.perf_counter() - began:.1f} s")
            out[variant] = {"outcome": outcome, "replies": seen[start:], "users": _read_users(pool, model)}
        on = on_clients(pool, CLIENTS, ATTRIBUTES, DEFENDING, classes)
        on.begin()  # the null level's class sums: each client counts under its public pseudo-class
        out["null"] = FlowerCloakClients(on, "df", LR).null_class_sums(1, NULL_KEY, NULL_SHARES)
        out["split"] = FlowerCloakClients(on, "df", LR).split_class_sums(1, SPLIT_KEYS)  # the covariance brake's
        on.finish()
        return out

    flower = simulate_then(config, federation.n_clients, after_training)
    pool = InProcessPool(config, federation)
    expected = run_as_the_runner_does(federated_server(config, federation, pool, Progress(1, False)), pool)
    return flower | {"config": config, "federation": federation, "classes": classes, "expected": expected,
                     "attributes": attributes, "model": pool.model}  # fmt: skip


def _inprocess(run, variant, embeddings):
    from fedunlearn.privacy.stage import attribute_classes

    config, federation = run["config"], run["federation"]
    attributes = federation.dataset.attributes.iloc[CLIENTS].reset_index(drop=True)
    classes = attribute_classes(attributes, ATTRIBUTES)
    assert [list(np.unique(a.labels)) for a in classes] == [list(range(len(c))) for c in run["classes"]]
    retention = None
    if variant == "dd":
        retention = DataRetention(run["model"], run["result"].shared, [federation.split.train_of(i) for i in CLIENTS],
                                  [federation.client_ids[i] for i in CLIENTS], config.model.loss,
                                  config.model.negatives, config.run.seed, config.defence.batch)  # fmt: skip
    return attrcloak(embeddings, classes, variant, STEPS, LR, np.array(DEFENDING), retention)


def test_flower_training_left_the_same_user_parts_as_the_inprocess_runner(run):
    for key, value in run["expected"].shared.items():
        np.testing.assert_array_equal(run["result"].shared[key], value)


@pytest.mark.parametrize("variant", ["df", "dd"])
def test_attrcloak_through_flower_equals_the_inprocess_defence(run, variant):
    before = run["trained"] if variant == "df" else run["df"]["users"]  # DD runs on the DF-defended clients
    expected = _inprocess(run, variant, before)
    flower = run[variant]
    assert flower["outcome"].embeddings is None  # the server never holds them
    np.testing.assert_allclose(flower["outcome"].weights, expected.weights, rtol=1e-4)
    # a loss near zero (DD's last step: 0.0036) is off by SecAgg+'s absolute rounding (measured 4e-7,
    # about one grid step of the class sums), which no relative tolerance covers
    np.testing.assert_allclose(flower["outcome"].losses, expected.losses, rtol=1e-4, atol=1e-6)
    after = flower["users"]
    gap = np.abs(after - expected.embeddings).max()
    weight_gap = np.abs(np.subtract(flower["outcome"].weights, expected.weights)).max()
    print(f"AttrCloak-{variant.upper()}: Flower vs in-process, embeddings {gap:.2e}, weights {weight_gap:.2e}")
    np.testing.assert_allclose(after, expected.embeddings.astype(np.float32), rtol=0, atol=1e-4)
    moved = np.linalg.norm(after - before, axis=1)
    assert np.all(moved[np.array(DEFENDING)] > 0.03) and np.all(moved[~np.array(DEFENDING)] == 0)
    assert any(0.1 < w < 1 for w in expected.weights)  # the min-norm weight, not only a clip bound
    n = len(CLIENTS)
    assert n * resolution(n, CLASS_SUMS_BOUND) < 1e-5 and n * resolution(n, PRODUCTS_BOUND) < 1e-5


def test_the_null_levels_class_sums_through_flower_are_the_pseudo_classes_sums(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    assert len(run["classes"][1]) == len(NULL_SHARES)
    labels = null_labels(run["config"].run.seed, NULL_KEY, ids, NULL_SHARES)
    expected = ClassSums.of(run["dd"]["users"], labels, len(NULL_SHARES))  # the clients hold DD's embeddings
    flower = run["null"]
    np.testing.assert_array_equal(flower.counts, expected.counts)
    np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
    np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
    own = ClassSums.of(run["dd"]["users"], _own_labels(run, 1), len(NULL_SHARES))
    assert not np.allclose(own.sums, expected.sums, atol=1e-2)  # not the clients' own classes


def test_the_covariance_brakes_class_sums_through_flower_are_each_class_per_public_half(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    k = len(run["classes"][1])
    assert len(run["split"]) == len(SPLIT_KEYS)  # every split from one secure sum
    for key, flower in zip(SPLIT_KEYS, run["split"], strict=True):
        labels = 2 * _own_labels(run, 1) + half_labels(run["config"].run.seed, key, ids)
        expected = ClassSums.of(run["dd"]["users"], labels, 2 * k)  # the clients hold DD's embeddings
        np.testing.assert_array_equal(flower.counts, expected.counts)
        np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
        assert 0 < (labels % 2).sum() < len(labels)  # both halves are there
    assert not np.array_equal(run["split"][0].counts, run["split"][1].counts)  # other splits, other halves


def _own_labels(run, attribute):
    values = run["attributes"][ATTRIBUTES[attribute]].iloc[CLIENTS].to_numpy()
    return np.array([run["classes"][attribute].index(value) for value in values])


@pytest.mark.parametrize("variant", ["df", "dd"])
def test_no_reply_during_the_defence_carries_an_embedding_or_an_attribute(run, variant):
    replies = run[variant]["replies"]
    vectors = [run["trained"], run["df"]["users"], run["dd"]["users"]]
    attribute_values = set(run["attributes"].iloc[CLIENTS].to_numpy().ravel())
    assert len(replies) > 0
    assert_no_secret_in(replies, vectors, attribute_values)
    # the queries answer with the client's id only; the rest are SecAgg+ stages
    identities = [c for c in replies if "meta" in c]
    assert all(set(c.keys()) == {"meta"} for c in identities)
    steps = sum(DEFENDING) * STEPS
    assert len(identities) == len(CLIENTS) * 2 + steps  # start, finish, and each defending client's steps
    sums = len(ATTRIBUTES) * 2 + STEPS * (len(ATTRIBUTES) + 1)
    assert len(replies) - len(identities) == 4 * len(CLIENTS) * sums  # 4 SecAgg+ stages per sum
