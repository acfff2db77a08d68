"""AttrCloak through Flower messages: each client defends its own embedding, the server sees sums.

One simulation for the module: 12 clients train 2 rounds through Flower, then 11 of them run
AttrCloak-DF and after it AttrCloak-DD (3 steps each, 8 of the 11 defending) through
server.defence.flower_attrcloak. The auditor's query (query.audit_users, the simulation's oracle)
reads the clients' user parts back after each defence; the in-process `attrcloak` on the same
embeddings is the reference. D2D-R and U2U-R, and clients deciding alone whether they defend:
tests/test_flower_regularised.py.

Of age's five values among the 11, two are held by three clients each and three by one or two:
the holders of those three (5 clients) are left out of every sum of both attributes
(fedunlearn.privacy.cells), so the defences sum 6 clients. The null level and the covariance
brake are queried on gender alone over all 11: draws with a pseudo-class of one or two clients are
skipped, and a class is split only into halves of three or more.

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
OUTSIDE = [0, 2, 3, 7, 8]  # positions in CLIENTS of the holders of age's rare values: in no sum
NULL_KEYS, NULL_SHARES, NULL_WANTED = list(range(5, 17)), np.array([0.85, 0.15]), 2  # over gender's two classes
SPLIT_KEYS = list(range(3, 19))  # gender: M 6, F 5 of CLIENTS; only M can split, and only into 3 + 3


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
        on = on_clients(pool, CLIENTS, ATTRIBUTES[:1], DEFENDING, classes[:1])  # gender: no one left out
        on.begin()  # the null level's class sums: each client counts under its public pseudo-class
        out["null"] = FlowerCloakClients(on, "df", LR).null_class_sums(0, NULL_KEYS, NULL_SHARES, NULL_WANTED)
        out["split"] = FlowerCloakClients(on, "df", LR).split_class_sums(0, SPLIT_KEYS)  # the covariance brake's
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
    inside = np.array(DEFENDING) & ~np.isin(np.arange(len(CLIENTS)), OUTSIDE)
    assert np.all(moved[inside] > 0.03) and np.all(moved[~inside] == 0)  # the left-out do not move
    if variant == "df":  # the min-norm weight, not only a clip bound (DD's, on 6 clients, sits at its bounds)
        assert any(0.1 < w < 1 for w in expected.weights)
    n = len(CLIENTS)
    assert n * resolution(n, CLASS_SUMS_BOUND) < 2e-5 and n * resolution(n, PRODUCTS_BOUND) < 1e-5


def test_the_null_levels_class_sums_through_flower_are_the_pseudo_classes_sums(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    own = _own_labels(run, 0, everyone=True)
    drawn = [null_labels(run["config"].run.seed, key, ids, NULL_SHARES) for key in NULL_KEYS]
    clean = [labels for labels in drawn if np.all(np.isin(np.bincount(labels, minlength=2), [0, 3, 4, 5, 6, 7, 8,
                                                                                           9, 10, 11]))]  # fmt: skip
    assert len(clean) >= NULL_WANTED and len(clean) < len(drawn)  # some draws skipped
    assert len(run["null"]) == NULL_WANTED  # the first clean ones, from one secure sum
    for labels, flower in zip(clean, run["null"], strict=False):
        expected = ClassSums.of(run["dd"]["users"], labels, len(NULL_SHARES))  # the clients hold DD's embeddings
        np.testing.assert_array_equal(flower.counts, expected.counts)
        np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
        mine = ClassSums.of(run["dd"]["users"], own, len(NULL_SHARES))
        assert not np.allclose(mine.sums, expected.sums, atol=1e-2)  # not the clients' own classes


def test_the_covariance_brakes_class_sums_through_flower_are_each_class_per_public_half(run):
    ids = [run["federation"].client_ids[i] for i in CLIENTS]
    assert len(run["split"]) == len(SPLIT_KEYS)  # every split from one secure sum
    own = _own_labels(run, 0, everyone=True)
    kept = 0
    for key, flower in zip(SPLIT_KEYS, run["split"], strict=True):
        cells = 2 * own + half_labels(run["config"].run.seed, key, ids)
        counts = np.bincount(cells, minlength=4)
        both = np.repeat(np.minimum(counts[0::2], counts[1::2]) >= 3, 2)  # a class only if both halves hold 3
        labels = np.where(both[cells], cells, -1)
        expected = ClassSums.of(run["dd"]["users"], labels, 4)  # the clients hold DD's embeddings
        np.testing.assert_array_equal(flower.counts, expected.counts)
        np.testing.assert_allclose(flower.sums, expected.sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(flower.outers, expected.outers, rtol=0, atol=1e-4)
        kept += both.any()
    assert 0 < kept < len(SPLIT_KEYS)  # some splits summed a class, some none


def test_a_class_of_one_or_two_clients_is_left_out_of_the_defences_sums(run):
    assert run["classes"][1] != AGE_KEPT  # all the dataset's values were offered
    values = run["attributes"]["age"].iloc[CLIENTS].to_numpy()
    counts = {value: (values == value).sum() for value in set(values)}
    assert sorted(value for value, count in counts.items() if count >= 3) == AGE_KEPT
    assert sorted(count for count in counts.values() if count < 3) == [1, 2, 2]
    assert sorted(np.flatnonzero(~np.isin(values, AGE_KEPT))) == OUTSIDE
    counts = np.concatenate([sums.counts for sums in run["received"]])
    assert len(run["received"]) > 20 and counts.max() >= 3
    assert not np.any((counts > 0) & (counts < 3)), sorted(set(counts.tolist()))  # no sum over one or two
    totals = {sums.counts.sum() for sums in run["received"][:16]}  # the two defences' class sums
    assert totals == {len(CLIENTS) - len(OUTSIDE)}  # the same 6 clients in each: no difference isolates any


def _own_labels(run, attribute, everyone=False):
    """Each client's class among the classes the defence sums; -1 for the holders of age's rare
    values (the test's own count), unless `everyone` (the gender-only queries)."""
    values = run["attributes"][ATTRIBUTES[attribute]].iloc[CLIENTS].to_numpy()
    out = np.zeros(len(CLIENTS), dtype=bool) if everyone else np.isin(np.arange(len(CLIENTS)), OUTSIDE)
    kept = sorted(set(values[~out]))
    return np.array([-1 if gone else kept.index(value) for value, gone in zip(values, out, strict=True)])


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
    counts = 2 * len(ATTRIBUTES)  # counted twice: then again without the holders of age's rare values
    sums = counts + len(ATTRIBUTES) * 2 + STEPS * (len(ATTRIBUTES) + 1)  # class sums, fourth powers; steps
    assert len(replies) - len(identities) == 4 * len(CLIENTS) * sums  # 4 SecAgg+ stages per sum
