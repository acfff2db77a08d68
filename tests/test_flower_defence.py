"""AttrCloak through Flower messages: each client defends its own embedding, the server sees sums.

One simulation for the module: 12 clients train 2 rounds through Flower, then 11 of them run
AttrCloak-DF and after it AttrCloak-DD (3 steps each, 8 of the 11 defending) through
server.defence.flower_attrcloak. The auditor's query (query.audit_users, the simulation's oracle)
reads the clients' user parts back after each defence; the in-process `attrcloak` on the same
embeddings is the reference. D2D-R and U2U-R, and clients deciding alone whether they defend:
tests/test_flower_regularised.py.

Of age's five values among the 11, two are held by three clients each and three by one or two:
those clients are left out of age's sums (fedunlearn.privacy.cells), as are the members of the
null level's and the covariance brake's random cells under three clients.

Tolerance: the server's inputs differ from the plain sums only by SecAgg+'s rounding, at most
n * resolution(n, bound) per summed value (n = 11: 1.0e-5 for the class sums, bound 128; 5.2e-6 for
the products, bound 64; relative 2n/Q ~ 1e-7 for the fourth powers). Three steps of Gaussian fits,
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

SMALL = TINY + ["data.synthetic_users=12", "train.rounds=2", "eval.every=2", "train.fraction=1", "run.engine=flower"]
CLIENTS = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # a subset, so the index -> node mapping matters
DEFENDING = [True, True, False, True, True, True, False, True, True, False, True]
ATTRIBUTES = ["gender", "age"]
STEPS, LR = 3, 0.05
AGE_KEPT = ["25-34", "35-44"]  # held by 3 of CLIENTS each; the other three values by one or two
NULL_KEYS, NULL_SHARES = [5, 6], np.array([0.8, 0.2])  # over age's two kept classes
SPLIT_KEYS = [3, 4, 9, 10, 11, 12, 13, 14]  # classes of three: a cell is summed only when all three share a half


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
        seen, out = pool.replies_seen, {"result": result, "received": []}
        for name in ("class_sums", "cell_sums"):  # every class sum the server gets from here on
            def recording(*args, _sum=getattr(pool, name), **kwargs):
                sums = _sum(*args, **kwargs)
                out["received"].extend(sums if isinstance(sums, list) else [sums])
                return sums

            setattr(pool, name, recording)
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
        out["null"] = FlowerCloakClients(on, "df", LR).null_class_sums(1, NULL_KEYS, NULL_SHARES)
        out["split"] = FlowerCloakClients(on, "df", LR).split_class_sums(1, SPLIT_KEYS)  # the covariance brake's
        on.finish()
        return out

    flower = simulate_then(config, federation.n_clients, after_training)
    pool = InProcessPool(config, federation)
    expected = run_as_the_runner_does(federated_server(config, federation, pool, Progress(1, False)), pool)
    return flower | {"config": config, "federation": federation, "classes": classes, "expected": expected,
                     "attributes": attributes, "model": pool.model}  # fmt: skip


def _inprocess(run, variant, embeddings):
    from fedunlearn.privacy.stage import defence_classes

    config, federation = run["config"], run["federation"]
    attributes = federation.dataset.attributes.iloc[CLIENTS].reset_index(drop=True)
    classes = defence_classes(attributes, ATTRIBUTES)
    np.testing.assert_array_equal(classes[1].labels, _own_labels(run, 1))
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
    assert n * resolution(n, CLASS_SUMS_BOUND) < 2e-5 and n * resolution(n, PRODUCTS_BOUND) < 1e-5


def test_the_null_levels_class_sums_through_flower_are_the_pseudo_classes_sums(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    own = _own_labels(run, 1)
    assert len(run["null"]) == len(NULL_KEYS)  # every draw from one secure sum
    left_out = 0
    for key, flower in zip(NULL_KEYS, run["null"], strict=True):
        pseudo = np.where(own >= 0, null_labels(run["config"].run.seed, key, ids, NULL_SHARES), -1)
        labels = _cells_of_three_or_more(pseudo, len(NULL_SHARES))
        left_out += ((pseudo >= 0) & (labels < 0)).sum()
        expected = ClassSums.of(run["dd"]["users"], labels, len(NULL_SHARES))  # the clients hold DD's embeddings
        np.testing.assert_array_equal(flower.counts, expected.counts)
        np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
        mine = ClassSums.of(run["dd"]["users"], own, len(NULL_SHARES))
        assert not np.allclose(mine.sums, expected.sums, atol=1e-2)  # not the clients' own classes
    assert left_out > 0  # a pseudo-class under three clients was left out


def test_the_covariance_brakes_class_sums_through_flower_are_each_class_per_public_half(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    k = len(AGE_KEPT)
    assert len(run["split"]) == len(SPLIT_KEYS)  # every split from one secure sum
    own = _own_labels(run, 1)
    kept = 0
    for key, flower in zip(SPLIT_KEYS, run["split"], strict=True):
        cells = np.where(own >= 0, 2 * own + half_labels(run["config"].run.seed, key, ids), -1)
        labels = _cells_of_three_or_more(cells, 2 * k)
        expected = ClassSums.of(run["dd"]["users"], labels, 2 * k)  # the clients hold DD's embeddings
        np.testing.assert_array_equal(flower.counts, expected.counts)
        np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
        kept += (labels >= 0).sum()
        assert 0 < (cells[cells >= 0] % 2).sum() < (cells >= 0).sum()  # both halves are there
    assert 0 < kept < len(SPLIT_KEYS) * (own >= 0).sum()  # some cells summed, some left out


def test_a_class_of_one_or_two_clients_is_left_out_of_the_defences_sums(run):
    assert run["classes"][1] != AGE_KEPT  # all the dataset's values were offered
    values = run["attributes"]["age"].iloc[CLIENTS].to_numpy()
    counts = {value: (values == value).sum() for value in set(values)}
    assert sorted(value for value, count in counts.items() if count >= 3) == AGE_KEPT
    assert sorted(count for count in counts.values() if count < 3) == [1, 2, 2]
    counts = np.concatenate([sums.counts for sums in run["received"]])
    assert len(run["received"]) > 20 and counts.max() >= 3
    assert not np.any((counts > 0) & (counts < 3)), sorted(set(counts.tolist()))  # no sum over one or two


def _cells_of_three_or_more(labels, n_cells):
    """The test's own count: members of a cell under three clients are out (-1)."""
    counts = np.bincount(labels[labels >= 0], minlength=n_cells)
    return np.where((labels >= 0) & (counts[np.maximum(labels, 0)] >= 3), labels, -1)


def _own_labels(run, attribute):
    """Each client's class among the classes the defence sums (-1: left out)."""
    values = run["attributes"][ATTRIBUTES[attribute]].iloc[CLIENTS].to_numpy()
    kept = sorted(value for value in set(values) if (values == value).sum() >= 3)
    return np.array([kept.index(value) if value in kept else -1 for value in values])


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
    sums = len(ATTRIBUTES) * 3 + STEPS * (len(ATTRIBUTES) + 1)  # counts, class sums, fourth powers; steps
    assert len(replies) - len(identities) == 4 * len(CLIENTS) * sums  # 4 SecAgg+ stages per sum
