"""Wrong numbers never look right: non-finite scores are never hits, a diverged run is an error,
and faulty clients are caught and counted on every engine."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from helpers import TINY
from scipy.stats import trim_mean

from fedunlearn.cli import main
from fedunlearn.config import FAULT_KINDS, load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.aggregation import aggregate
from fedunlearn.fl.client import local_evaluate
from fedunlearn.fl.faults import fault_of
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.robust import coordinatewise, server_delta
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.metrics import rank_of_target
from fedunlearn.models import build_model
from fedunlearn.models.mf import MF
from fedunlearn.runs.assembly import federated_server

ALL_KINDS = '["nan","inf","shape","item_range","huge_norm","exception","spoof_id"]'
SMALL = ["data.synthetic_users=40", "data.synthetic_items=120", "data.synthetic_interactions=12",
         "data.test_negatives=19", "model.dim=8", "train.rounds=4", "eval.every=2"]  # fmt: skip


def test_a_non_finite_score_is_never_a_hit():
    others = np.array([0.1, 0.2, 0.3])
    assert rank_of_target(np.nan, others) == 3
    assert rank_of_target(np.inf, others) == 3
    assert rank_of_target(0.5, np.array([0.1, np.nan, 0.3])) == 1  # a NaN counts against the target
    assert rank_of_target(0.5, np.array([np.nan, np.nan])) == 2


def test_a_client_whose_model_is_nan_ranks_its_test_item_last():
    config = load_config(None, TINY)
    federation = build_federation(config.data, config.run.seed)
    model = build_model(config.model, federation.n_items)
    shared = {key: np.full_like(value, np.nan) for key, value in model.init_shared(np.random.default_rng(0)).items()}
    user = {key: np.full_like(value, np.nan) for key, value in model.init_user(np.random.default_rng(0)).items()}
    evaluation = local_evaluate(model, federation.client(0), user, shared, config, "cpu")
    assert evaluation.rank == config.data.test_negatives  # was 0: every comparison with NaN is False


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["train.lr", "train.server_lr", "model.init_std", "train.weight_decay", "unlearn.r"])
def test_config_refuses_non_finite_numbers(key, value):
    with pytest.raises(FedUnlearnError, match=f"{key} must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_a_toml_file_with_nan_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = nan\n")
    with pytest.raises(FedUnlearnError, match="train.lr must be a finite number"):
        load_config(path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.optimizer=sgd", "train.lr=100", "train.max_loss_growth=10"],
         "training diverged at round 3: mean training loss"),  # 32.1 against round 1's 0.693
        (["train.optimizer=sgd", "train.lr=1e6"], "training diverged at round 2: 0 valid replies of 40 (40 loss"),
        (["run.mode=central", "central.lr=1e8"],  # finite, scored HR@10 0.46 on ML-100K before this check
         "training diverged at central epoch 1: mean training loss 9.88e+15 is over 100; lower central.lr"),
        (["faults.share=1", "faults.kinds=[nan]"], "training diverged at round 1: 0 valid replies of 40 (40 nan"),
        (["faults.share=1", "faults.kinds=[exception]"], "first client error: injected fault"),
        (["train.min_replies=40", "faults.share=0.2", "faults.kinds=[shape]"], "fewer than train.min_replies = 40"),
    ],
)
def test_a_diverged_or_starved_run_is_one_line_and_no_results(tmp_path, capsys, settings, message):
    out = tmp_path / "run"
    args = [part for setting in SMALL + settings for part in ("--set", setting)]
    assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedunlearn: error: ") and message in err and "\n" not in err
    assert not list(tmp_path.rglob("final.json"))


@pytest.mark.parametrize(
    ("settings", "advice"),
    [
        (["train.lr=3"], "its training loss rose from 0.693 (round 1) to 20.7 (round 4): the training is unstable"),
        (["train.lr=10", "train.max_loss_growth=0"], "some clients' training diverged (above): lower train.lr"),
    ],
)
def test_a_run_that_learned_nothing_because_it_diverged_is_told_so_not_to_train_longer(tmp_path, capsys, settings,
                                                                                        advice):  # fmt: skip
    args = [part for setting in SMALL + settings for part in ("--set", setting)]
    assert main(["run", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert advice in err and "train longer" not in err
    rejected = json.loads((tmp_path / "run" / "final.json").read_text())["rejected_updates"].get("loss", 0)
    assert ("97 uploads were rejected for a training loss outside [0, 100]" in err) == (rejected == 97)


def test_a_run_that_barely_moved_is_told_to_train_longer_not_to_lower_its_rate(tmp_path, capsys):
    """Its loss drifts up by noise (0.694 -> 0.695): no rise, and lowering the rate would not help (a review)."""
    settings = ["data.synthetic_users=40", "train.rounds=3", "train.lr=1e-6"]
    args = [part for setting in settings for part in ("--set", setting)]
    assert main(["run", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "the model has not learned yet; train longer (train.rounds)" in err and "rose" not in err


def expected_rejections(config, federation):
    """What every fault drawn for this config must be counted as (huge_norm: over the median norm)."""
    reason = {"huge_norm": "norm"}
    counts = Counter()
    for round_number in range(1, config.train.rounds + 1):
        for client in federation.client_ids:
            kind = fault_of(config.faults, config.run.seed, round_number, client)
            if kind:
                counts[reason.get(kind, kind)] += 1
    return dict(sorted(counts.items()))


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_every_injected_fault_is_caught_and_counted_the_same_on_both_engines(tmp_path, model):
    settings = SMALL + [f"model.name={model}", "faults.share=0.3", f"faults.kinds={ALL_KINDS}"]
    finals = {}
    for engine in ("inprocess", "batched"):
        args = [part for setting in settings for part in ("--set", setting)]
        assert main(["run", *args, "--engine", engine, "--out", str(tmp_path / engine), "--quiet"]) == 0
        finals[engine] = json.loads((tmp_path / engine / "final.json").read_text())
    config = load_config(None, settings)
    expected = expected_rejections(config, build_federation(config.data, config.run.seed))
    assert set(expected) == {"exception", "inf", "item_range", "nan", "norm", "shape", "spoof_id"}
    for final in finals.values():
        assert final["rejected_updates"] == expected
        assert np.isfinite(final["metrics"]["HR@10"]) and final["metrics"]["HR@10"] < 1
    if model == "mf":  # NCF with BPR and Adam: the engines differ by float noise (docs/ARCHITECTURE.md)
        first, second = ({k: v for k, v in f["metrics"].items() if k != "seconds"} for f in finals.values())
        assert first == pytest.approx(second, abs=1e-6)


def test_the_faulty_clients_are_exactly_the_ones_left_out_of_the_round():
    """A faulty client's upload is dropped whole: the round equals one where it was never asked."""
    config = load_config(None, SMALL + ["faults.share=0.25", "faults.kinds=[nan]"])
    clean = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    from fedunlearn.progress import Progress

    faulty = federated_server(config, federation, InProcessPool(config, federation), Progress(1, False))
    honest = federated_server(clean, federation, InProcessPool(clean, federation), Progress(1, False))
    everyone = list(range(federation.n_clients))
    bad = {i for i in everyone if fault_of(config.faults, 0, 1, federation.client_ids[i])}
    assert bad and len(bad) < len(everyone)
    got, _ = faulty.train_round(1, everyone, faulty.initial)
    want, _ = honest.train_round(1, [i for i in everyone if i not in bad], honest.initial)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert faulty.rejected["updates"] == {"nan": len(bad)}


def test_fault_draws_cover_the_share_and_every_kind():
    kinds = [kind for kind in FAULT_KINDS if kind != "timeout"]
    config = load_config(None, ["faults.share=0.2", f"faults.kinds={kinds}".replace("'", '"')])
    ids = [str(i) for i in range(5000)]
    kinds = [fault_of(config.faults, 0, 3, c) for c in ids]
    share = np.mean([k is not None for k in kinds])
    assert 0.18 < share < 0.22
    assert set(kinds) - {None} == set(config.faults.kinds)
    assert kinds == [fault_of(config.faults, 0, 3, c) for c in ids]  # seeded
    assert kinds != [fault_of(config.faults, 0, 4, c) for c in ids]  # per round


def test_timeout_faults_need_the_flower_engine():
    with pytest.raises(FedUnlearnError, match="needs run.engine=flower"):
        load_config(None, ["faults.kinds=[timeout]"])
    with pytest.raises(FedUnlearnError, match="faults.kinds must name"):
        load_config(None, ["faults.kinds=[melt]"])


def test_coordinatewise_rules_equal_numpy_median_and_scipy_trim_mean():
    values = np.random.default_rng(0).normal(size=(11, 4, 3))
    np.testing.assert_allclose(coordinatewise(values, "median", 0.1), np.median(values, axis=0))
    np.testing.assert_allclose(coordinatewise(values, "trimmed-mean", 0.2), trim_mean(values, 0.2, axis=0))
    gappy = values.copy()
    gappy[7:, 0] = np.nan  # row 0 was touched by 7 clients only
    np.testing.assert_allclose(coordinatewise(gappy, "trimmed-mean", 0.2)[0], trim_mean(values[:7, 0], 0.2, axis=0))
    np.testing.assert_allclose(coordinatewise(gappy, "median", 0.2)[0], np.median(values[:7, 0], axis=0))


def test_row_wise_median_ignores_one_poisoned_upload():
    model = MF(n_items=3, dim=1, init_std=0.1)
    shared = {"item_emb": np.zeros((3, 1), dtype=np.float32)}
    row = lambda *v: {"item_emb": np.array(v, np.float32).reshape(-1, 1)}  # noqa: E731
    updates = [
        ClientUpdate("a", 1, np.array([0, 1]), row(1.0, 2.0), {}, 0.0),
        ClientUpdate("b", 1, np.array([0, 1]), row(3.0, 4.0), {}, 0.0),
        ClientUpdate("c", 9, np.array([0, 2]), row(1000.0, 5.0), {}, 0.0),
    ]
    median = server_delta(model, shared, updates, 1.0, "median", 0.1)["item_emb"].ravel()
    np.testing.assert_allclose(median, [3.0, 3.0, 5.0])  # row 1: (2, 4) only; row 2: c alone
    mean = aggregate(model, shared, updates, 1.0)["item_emb"].ravel()
    assert mean[0] > 800  # the weighted mean is dragged by c


def test_without_a_norm_check_huge_uploads_diverge_and_clipping_to_the_median_saves_the_run(tmp_path):
    settings = SMALL + ["faults.share=0.2", "faults.kinds=[huge_norm]", "train.reject_norm_ratio=0"]
    hr = {}
    for name, extra in {"unprotected": [], "clipped": ["train.clip_norm_ratio=3"], "clean": ["faults.share=0"]}.items():
        args = [part for setting in settings + extra for part in ("--set", setting)]
        code = main(["run", *args, "--out", str(tmp_path / name), "--quiet"])
        hr[name] = json.loads((tmp_path / name / "final.json").read_text())["metrics"]["HR@10"] if code == 0 else None
    assert hr["unprotected"] is None  # stopped as diverged, not scored
    assert hr["clipped"] >= hr["clean"] - 0.1


@pytest.mark.parametrize("spoofed", [1, 30])
def test_rejected_evaluations_are_counted_in_each_row_warned_and_a_minority_is_refused(
    tmp_path, capsys, monkeypatch, spoofed
):
    """A lying client's evaluation used to vanish from metrics.csv: 39 of 40 spoofed replies left an
    HR@10 of one user, reported as the model's, with no warning."""
    from dataclasses import replace

    honest = InProcessPool.evaluate

    def evaluate(self, clients, shared, done):
        replies = honest(self, clients, shared, done)
        for reply in replies:
            if reply.sender < spoofed:
                reply.value = replace(reply.value, client_id="nobody")
        return replies

    monkeypatch.setattr(InProcessPool, "evaluate", evaluate)
    out = tmp_path / "run"
    args = [part for setting in SMALL for part in ("--set", setting)]
    code = main(["run", *args, "--engine", "inprocess", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    if spoofed == 30:  # 10 of 40 pass: too few to score the model
        assert code == 2 and "evaluation: 10 valid replies of 40 (30 spoof_id rejected)" in err
        assert not list(tmp_path.rglob("final.json"))
        return
    assert code == 0 and "warning: evaluation replies were rejected (" in err
    metrics = pd.read_csv(out / "metrics.csv")
    assert (metrics["evaluated"] == 39).all()
    final = json.loads((out / "final.json").read_text())
    assert final["rejected_evaluations"] == {"spoof_id": len(metrics)}  # one per evaluated round
