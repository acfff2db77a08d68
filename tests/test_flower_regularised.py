"""D2D-R and U2U-R through Flower messages: each client defends its own embedding, the server sees
sums; and clients that decide alone whether they defend (`defence.clients = "at-risk"`).

One simulation for the module: 12 clients train 2 rounds through Flower, then 11 of them run D2D-R
(8 of the 11 defending, chosen by the server) and after it U2U-R (each client decides from the
attackers shipped to it), 3 steps each, through server.defence.flower_regularised. The auditor's
query (query.audit_users, the simulation's oracle) reads the user parts back after each defence;
the in-process `regularised_defence` on the same embeddings is the reference. Then, as
`defence.compare` does, U2U-R and D2D-R once more (1 step each) with the user parts kept: each must
start from them, and `query.defence_end` must restore them. Five of the 11 hold an age that fewer than
three of them share: they are left out of age's sums (fedunlearn.privacy.cells), on both paths.

Tolerance: as in tests/test_flower_defence.py, the server's inputs differ from the plain sums only
by SecAgg+'s rounding (n = 11: 1.0e-5 for the class sums, bound 128; 8e-8 for D2D-R's features,
bound 1; D2D-R's scale from class sums with a bound of about max(1, sum ||e||^2)); three steps of
the losses' gradients and Adam carry that on: the same losses to 1e-4 (relative) and the same
embeddings to 1e-4 (absolute), against moves of order 0.1."""

import time

import numpy as np
import pytest
from helpers import TINY, assert_no_secret_in, simulate_then
from sklearn.linear_model import LogisticRegression

from fedunlearn.config import load_config
from fedunlearn.fl.federation import build_federation
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.baselines import regularised_defence
from fedunlearn.privacy.common import flatten_users
from fedunlearn.privacy.stage import at_risk, defence_classes

pytestmark = [pytest.mark.flower, pytest.mark.slow]  # 11 clients (a class of three or more to sum): ~60 s

SMALL = TINY + ["data.synthetic_users=12", "train.rounds=2", "eval.every=2", "train.fraction=1", "run.engine=flower"]
CLIENTS = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
DEFENDING = [True, True, False, True, True, True, False, True, True, False, True]  # D2D-R; U2U-R: at risk
ATTRIBUTES = ["gender", "age"]
STEPS, LR, WEIGHT = 3, 0.05, 0.5


def _attackers(embeddings, attributes):
    """Attackers that fit these very embeddings, one per attribute (the audit's would do the same)."""
    out = []
    for name in ATTRIBUTES:
        classes, labels = np.unique(attributes[name].to_numpy().astype(str), return_inverse=True)
        out.append(Attacker("logistic", name, classes, LogisticRegression(C=10.0).fit(embeddings, labels)))
    return out


@pytest.fixture(scope="module")
def run():
    from server.defence import flower_regularised, on_clients

    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    attributes = federation.dataset.attributes.iloc[CLIENTS].reset_index(drop=True)
    classes = [sorted(set(attributes[name].astype(str))) for name in ATTRIBUTES]

    def after_training(result, pool):
        from fedunlearn.models import build_model

        model = build_model(config.model, federation.n_items)
        seen, out = pool.replies_seen, {"trained": flatten_users(model, pool.audit_users(CLIENTS))}
        for method in ("d2d-r", "u2u-r"):
            before = out["trained"] if method == "d2d-r" else out["d2d-r"]["users"]
            defending, attackers, threshold = DEFENDING, [], 0.5
            if method == "u2u-r":  # at risk: a threshold between the clients' own-class confidences
                attackers = _attackers(before, attributes)
                risk = np.max(
                    [a.proba(before)[np.arange(len(CLIENTS)), a.classifier.predict(before)] for a in attackers], 0
                )
                defending, threshold = None, float(np.median(risk))
            on = on_clients(pool, CLIENTS, ATTRIBUTES, defending, classes, None, attackers, threshold)
            start, began = len(seen), time.perf_counter()
            outcome = flower_regularised(on, method, STEPS, LR, WEIGHT, config.run.seed)
            print(f"{method.upper()} through Flower, {STEPS} steps: {time.perf_counter() - began:.1f} s")
            replies = seen[start:]
            users = flatten_users(model, pool.audit_users(CLIENTS))
            out[method] = {"outcome": outcome, "replies": replies, "users": users, "before": before,
                           "attackers": attackers, "threshold": threshold}  # fmt: skip
        # as with defence.compare: two defences, each from the user parts held before them, then back
        base, compared, compare_replies = out["u2u-r"]["users"], {}, []
        for method in ("u2u-r", "d2d-r"):
            on = on_clients(pool, CLIENTS, ATTRIBUTES, DEFENDING, classes, keep_trained=True)
            start = len(seen)
            flower_regularised(on, method, 1, LR, WEIGHT, config.run.seed)
            compare_replies += seen[start:]
            compared[method] = flatten_users(model, pool.audit_users(CLIENTS))
        start = len(seen)
        pool.defence_end(CLIENTS, restore=True)
        end_replies = seen[start:]
        out["compared"] = {"base": base, "after": compared, "restored": flatten_users(model, pool.audit_users(CLIENTS)),
                           "replies": compare_replies, "end_replies": end_replies}  # fmt: skip
        return out

    flower = simulate_then(config, federation.n_clients, after_training)
    return flower | {"config": config, "attributes": attributes}


def _expected(run, method):
    flower = run[method]
    before, attributes = flower["before"], run["attributes"]
    if method == "d2d-r":
        defending = np.array(DEFENDING)
    else:
        defending = at_risk(flower["attackers"], before, attributes, flower["threshold"])
    classes = defence_classes(attributes, ATTRIBUTES)
    assert (classes[1].labels < 0).sum() == 5  # age: the holders of values fewer than three share
    outcome = regularised_defence(before, classes, method, STEPS, LR, WEIGHT, defending, run["config"].run.seed)
    return outcome, defending


@pytest.mark.parametrize("method", ["d2d-r", "u2u-r"])
def test_regularised_defences_through_flower_equal_the_inprocess_ones(run, method):
    expected, defending = _expected(run, method)
    flower = run[method]
    assert flower["outcome"].embeddings is None  # the server never holds them
    np.testing.assert_allclose(flower["outcome"].losses, expected.losses, rtol=1e-4)
    gap = np.abs(flower["users"] - expected.embeddings).max()
    print(f"{method.upper()}: Flower vs in-process, embeddings {gap:.2e}")
    np.testing.assert_allclose(flower["users"], expected.embeddings.astype(np.float32), rtol=0, atol=1e-4)
    moved = np.linalg.norm(flower["users"] - flower["before"], axis=1)
    inside = defending & (defence_classes(run["attributes"], ATTRIBUTES)[0].labels >= 0)  # the left-out stay
    assert np.all(moved[inside] > 0.03) and np.all(moved[~inside] == 0)
    assert 0 < defending.sum() < len(CLIENTS)  # the same clients defend as in-process, not all, not none


@pytest.mark.parametrize("method", ["d2d-r", "u2u-r"])
def test_no_reply_during_the_regularised_defences_carries_an_embedding_or_an_attribute(run, method):
    replies = run[method]["replies"]
    vectors = [run["trained"], run["d2d-r"]["users"], run["u2u-r"]["users"]]
    assert len(replies) > 0
    assert_no_secret_in(replies, vectors, set(run["attributes"][ATTRIBUTES].astype(str).to_numpy().ravel()))
    identities = [c for c in replies if "meta" in c]
    assert all(set(c.keys()) == {"meta"} for c in identities)
    # start, finish and the steps: to the defending clients the server chose; at risk, to every
    # client (the server does not learn who defends)
    stepping = sum(DEFENDING) if method == "d2d-r" else len(CLIENTS)
    assert len(identities) == len(CLIENTS) * 2 + stepping * STEPS
    sums = STEPS * len(ATTRIBUTES) + (2 if method == "d2d-r" else 0)  # D2D-R's scale: two class sums
    assert len(replies) - len(identities) == 4 * len(CLIENTS) * sums  # 4 SecAgg+ stages per sum


def test_with_keep_trained_each_defence_starts_from_the_kept_user_parts_and_the_end_restores_them(run):
    compared = run["compared"]
    base, classes = compared["base"], defence_classes(run["attributes"], ATTRIBUTES)
    for method, after in compared["after"].items():
        expected = regularised_defence(
            base, classes, method, 1, LR, WEIGHT, np.array(DEFENDING), run["config"].run.seed
        )
        np.testing.assert_allclose(after, expected.embeddings.astype(np.float32), rtol=0, atol=1e-4)
        assert np.abs(after - base).max() > 0.01
    np.testing.assert_array_equal(compared["restored"], base)


def test_no_reply_of_a_defence_comparison_or_of_its_end_carries_an_embedding(run):
    compared = run["compared"]
    vectors = [run["trained"], compared["base"], compared["restored"], *compared["after"].values()]
    assert len(compared["end_replies"]) == len(CLIENTS)  # query.defence_end: one answer per client
    assert all(set(content.keys()) == {"meta"} for content in compared["end_replies"])
    attribute_values = set(run["attributes"][ATTRIBUTES].astype(str).to_numpy().ravel())
    assert_no_secret_in(compared["replies"] + compared["end_replies"], vectors, attribute_values)
