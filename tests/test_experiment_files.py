"""The shipped experiment files load, and the one whose data cannot ship (ML-1M) runs end to end
on a small file in its format."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedunlearn.runs.experiment import load_settings, run_experiment

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("path", sorted(set(EXPERIMENTS.glob("*.toml")) - set(EXPERIMENTS.glob("suite_*.toml"))),
                         ids=lambda p: p.name)  # fmt: skip
def test_every_shipped_experiment_file_loads(path):
    settings = load_settings(path, None, None)
    assert settings and all(config.data.dataset for _, config in settings)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("suite_*.toml")), ids=lambda p: p.name)
def test_every_shipped_suite_lists_experiments_that_load_with_its_seeds_and_settings(path):
    from fedunlearn.runs.suite import load_suite

    seeds, entries, _ = load_suite(path)
    for entry in entries:
        settings = load_settings(entry.file, entry.overrides, entry.only or None, seeds)
        assert {config.run.seed for _, config in settings} == set(seeds)
        engines = {config.run.engine for _, config in settings if config.run.mode == "federated"}
        assert engines <= {"batched"}, (entry.name, engines)  # the fastest exact engine, as the file says


def write_ml1m_format(folder: Path, users: int, items: int, per_user: int, seed: int) -> int:
    """ratings.dat / users.dat as GroupLens writes them ("::"-separated, 1-based ids, ML-1M's age and
    occupation codes); returns the number of rating lines."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for user in range(1, users + 1):
        for item in rng.choice(np.arange(1, items + 1), per_user, replace=False):
            lines.append(f"{user}::{item}::{rng.integers(1, 6)}::{978300000 + len(lines)}")
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    ages, occupations = (1, 18, 25, 35, 45, 50, 56), range(21)
    (folder / "users.dat").write_text(
        "".join(
            f"{u}::{'FM'[u % 2]}::{ages[u % len(ages)]}::{occupations[u % 21]}::{10000 + u}\n"
            for u in range(1, users + 1)
        )
    )
    return len(lines)


def test_the_ml1m_unlearning_experiment_runs_on_a_small_file_in_its_format(tmp_path, monkeypatch):
    import fedunlearn.data.movielens as movielens

    users = 40
    lines = write_ml1m_format(tmp_path / "data" / "ml-1m", users=users, items=200, per_user=12, seed=3)
    monkeypatch.setenv("FEDUNLEARN_DATA_DIR", str(tmp_path / "data"))
    # the official line counts guard real copies; this file's are its own
    monkeypatch.setitem(movielens.OFFICIAL_COUNTS, "ml-1m", (lines, users))
    # leaving at round 4: FedEraser calibrates checkpoint 3
    overrides = ["train.rounds=5", "eval.every=5", "model.dim=8", 'unlearn.drop_random="5%@4"']
    out = tmp_path / "out"
    table = run_experiment(
        EXPERIMENTS / "unlearning_ml1m.toml", out, overrides, show_progress=False, only=["retrain", "federaser"]
    )
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 * 2 * 3 and set(runs["status"]) == {"ok"}  # 2 methods x MF, NCF x 3 seeds
    assert set(runs["engine"]) == {"batched"}
    assert sorted(zip(table["setting"], table["model"])) == [
        ("federaser", "mf"), ("federaser", "ncf"), ("retrain", "mf"), ("retrain", "ncf")
    ]  # fmt: skip
    federaser = table[table["setting"] == "federaser"]
    assert (federaser["speedup"] > 1).all() and (federaser["L2_to_retrain"] > 0).all()


def test_seeds_are_given_with_seeds_and_a_set_the_file_replaces_is_refused(tmp_path, capsys):
    """`--set run.seed=11` on a file listing seeds ran seeds 0-2 without a word (an independent
    re-measurement ran them believing otherwise); `--seeds` gives other seeds."""
    from fedunlearn.cli import main

    spec = tmp_path / "e.toml"
    spec.write_text('seeds = [0, 1]\nmodels = ["mf"]\n[base]\n"data.synthetic_users" = 12\n'
                    '"data.synthetic_items" = 60\n"data.synthetic_interactions" = 8\n"data.test_negatives" = 19\n'
                    '"model.dim" = 4\n"train.rounds" = 1\n[[setting]]\nname = "a"\n')  # fmt: skip
    taken, override = "but each run takes its own from", "an override (--set, or a suite's set),"
    for bad, message in ((["--set", "run.seed=11"], f"run.seed is set in {override} {taken} {spec}'s seeds"),
                         (["--set", "model.name=ncf"], f"model.name is set in {override} {taken} {spec}'s"),
                         (["--seeds", "3", "--set", "run.seed=1"], f"{taken} --seeds ([3])"),
                         (["--seeds", "11,x"], "--seeds '11,x' must be whole numbers"),
                         (["--seeds", "-1"], "--seeds '-1' must be whole numbers >= 0"),
                         (["--seeds", "3,3"], "--seeds lists 3 more than once")):  # fmt: skip
        assert main(["experiment", str(spec), "--out", str(tmp_path / "bad"), "--quiet", *bad]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and not (tmp_path / "bad").exists(), error
    assert main(["experiment", str(spec), "--out", str(tmp_path / "out"), "--quiet", "--seeds", "11,12"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "a" / "mf").iterdir()) == ["seed11", "seed12"]
    assert set(pd.read_csv(tmp_path / "out" / "runs.csv")["seed"]) == {11, 12}
    spec.write_text(spec.read_text().replace('"model.dim" = 4', '"model.dim" = 4\n"run.seed" = 11'))
    assert main(["experiment", str(spec), "--out", str(tmp_path / "in_file"), "--quiet"]) == 2  # in the file too
    assert f"run.seed is set in {spec}'s [base], {taken} {spec}'s seeds ([0, 1])" in capsys.readouterr().err
    suite = tmp_path / "suite.toml"
    spec.write_text(spec.read_text().replace("seeds = [0, 1]\n", ""))
    suite.write_text(f'seeds = [0]\n[[experiment]]\nname = "e"\nfile = "{spec}"\n')
    assert main(["suite", str(suite), "--out", str(tmp_path / "suite"), "--quiet"]) == 2
    assert f"{taken} {suite}'s seeds ([0])" in capsys.readouterr().err  # where the seeds were listed
