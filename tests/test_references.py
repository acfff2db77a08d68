"""The references a federated number is read against (central training, popularity) cover the same
users and data as the run, rank by the same rules, and train the same objective."""

import json

import numpy as np
import pytest

from fedunlearn.cli import main
from fedunlearn.config import load_config
from fedunlearn.fl.federation import build_federation
from fedunlearn.progress import Progress
from fedunlearn.reference import central
from fedunlearn.reference.popularity import rank_by_popularity

SMALL = ["data.synthetic_users=40", "data.synthetic_items=120", "data.synthetic_interactions=12",
         "data.test_negatives=19", "model.dim=8"]  # fmt: skip


def _independent_popularity_hr10(federation, kept):
    """Counts over the kept clients' training items; a negative as popular as the test item ranks above it."""
    counts = np.zeros(federation.n_items)
    for u in kept:
        counts[federation.split.train_of(u)] += 1
    hits = []
    for u in kept:
        data = federation.client(u)
        rank = int(np.sum(counts[data.test_negatives] >= counts[data.test_item]))
        hits.append(rank < 10)
    return float(np.mean(hits))


def test_popularity_counts_and_scores_only_the_clients_in_the_federation():
    """It counted every user's items, excluded and removed ones included, scored every user, and
    broke ties by a random jitter where every model counts them against the test item."""
    config = load_config(None, SMALL + ['data.exclude_clients=["3","7","11"]'])
    federation = build_federation(config.data, config.run.seed)
    left = [federation.client_ids[i] for i in (0, 1, 2, 4, 5)]
    got = rank_by_popularity(config, federation, left).final["HR@10"]
    kept = [i for i, c in enumerate(federation.client_ids) if c not in {"3", "7", "11", *left}]
    assert len(kept) == 32 and got == pytest.approx(_independent_popularity_hr10(federation, kept), abs=1e-12)
    everyone = rank_by_popularity(load_config(None, SMALL), federation).final["HR@10"]
    assert everyone == pytest.approx(_independent_popularity_hr10(federation, range(40)), abs=1e-12)


def test_central_trains_and_scores_only_the_clients_in_the_federation(monkeypatch):
    config = load_config(None, SMALL + ["run.mode=central", "central.epochs=1", 'data.exclude_clients=["3","7"]'])
    federation = build_federation(config.data, config.run.seed)
    trained, scored = set(), set()
    sample, evaluate = central.sample_pair_negatives, central.local_evaluate

    def sampled(rng, users, *rest):
        trained.update(users.tolist())
        return sample(rng, users, *rest)

    def evaluated(model, data, *rest):
        scored.add(data.client_id)
        return evaluate(model, data, *rest)

    monkeypatch.setattr(central, "sample_pair_negatives", sampled)
    monkeypatch.setattr(central, "local_evaluate", evaluated)
    central.train_central(config, federation, Progress(1, False))
    kept = [i for i, c in enumerate(federation.client_ids) if c not in {"3", "7"}]
    assert trained == set(kept) and scored == {federation.client_ids[i] for i in kept}


def test_central_adds_the_federated_minibatch_l2_and_defaults_to_its_value():
    """Central used Adam's weight decay, which shrinks every row at every step: at federated training's
    0.001 it drove ML-100K's item table to zero. Now the L2 is the federated one (on the embeddings a
    minibatch uses), with train.weight_decay's value unless central.weight_decay says otherwise."""

    def trained(*settings):
        config = load_config(None, SMALL + ["run.mode=central", "central.epochs=2", *settings])
        result = central.train_central(config, build_federation(config.data, config.run.seed), Progress(1, False))
        return np.concatenate([value.ravel() for value in result.shared.values()])

    default = trained("train.weight_decay=0.05")
    np.testing.assert_array_equal(default, trained("train.weight_decay=0.001", "central.weight_decay=0.05"))
    assert not np.array_equal(default, trained("train.weight_decay=0.05", "central.weight_decay=0"))
    with pytest.raises(Exception, match="central.weight_decay must be >= 0, or -1"):
        load_config(None, ["central.weight_decay=-0.5"])


def test_a_runs_popularity_reference_leaves_out_the_clients_its_drop_removed(tmp_path):
    args = [part for setting in [*SMALL, "train.rounds=3"] for part in ("--set", setting)]
    out = tmp_path / "run"
    assert main(["run", *args, "--drop", "1,2,3,4,5,6,7,8@2", "--method", "none", "--out", str(out), "--quiet"]) == 0
    final = json.loads((out / "final.json").read_text())
    federation = build_federation(load_config(None, SMALL).data, 0)
    kept = [i for i, c in enumerate(federation.client_ids) if c not in {str(c) for c in range(1, 9)}]
    assert final["popularity_HR@10"] == pytest.approx(_independent_popularity_hr10(federation, kept), abs=1e-12)


@pytest.mark.parametrize("mode", ["central", "popularity"])
def test_the_references_refuse_an_unknown_or_emptying_exclusion(tmp_path, capsys, mode):
    """They ignored an unknown id (HR@10 over everyone), and excluding every client ended in a numpy
    warning and a divergence hint."""
    for excluded, message in (('["nosuch"]', "names unknown clients ['nosuch']"),
                              (json.dumps([str(c) for c in range(40)]), "excludes every client")):  # fmt: skip
        args = [part for setting in [*SMALL, f"run.mode={mode}", f"data.exclude_clients={excluded}"]
                for part in ("--set", setting)]  # fmt: skip
        assert main(["run", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("fedunlearn: error: data.exclude_clients") and message in error and "\n" not in error
