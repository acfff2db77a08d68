import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedunlearn.cli import main

TINY = [
    "--set",
    "data.synthetic_users=20",
    "--set",
    "data.synthetic_items=80",
    "--set",
    "data.synthetic_interactions=10",
    "--set",
    "data.test_negatives=30",
    "--set",
    "model.dim=8",
    "--set",
    "train.rounds=2",
    "--set",
    "eval.every=1",
]


def test_run_writes_a_complete_results_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "final.json", "metrics.csv", "summary.md"]
    final = json.loads((out / "final.json").read_text())
    assert final["engine"] == "batched" and final["clients"] == 20  # auto: the fastest exact engine for MF
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [1, 2]
    assert final["metrics"]["HR@10"] == pytest.approx(metrics["HR@10"].iloc[-1])
    printed = capsys.readouterr().out
    assert "HR@10" in printed and "NDCG@10" in printed
    # the same folder twice is refused, and the first result stays intact
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "final.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.fraction=0"], "train.fraction must be in (0, 1]"),
        (["--set", "train.fraction=1.01"], "train.fraction must be in (0, 1]"),
        (["--set", "data.dataset=netflix"], "data.dataset = 'netflix' is not valid"),
        (["--set", "model.dim=-3"], "model.dim must be > 0"),
        (["no-such-config.toml"], "not found"),
        (["--drop", "99999@3"], "no client '99999'"),
        (["--drop", "3@500"], "use a round from 2 to train.rounds"),
        (["--set", "data.dataset=csv", "--set", "data.path=/nonexistent/x.csv"], "/nonexistent/x.csv"),
        (["--set", "defence.cloak_weight=2"], "defence.cloak_weight must be in [0, 1], or -1"),
        (["--set", "defence.risk_threshold=0.55"], "defence.risk_threshold must be one of 0.1, 0.2, ..., 0.9"),
        (["--set", "defence.cloak_weight=-0.5"], "defence.cloak_weight must be in [0, 1], or -1"),
        (["--set", "unlearn.method=fru", "--set", "train.aggregation=median"], "'fru': replay measures"),
        (["--set", "unlearn.compare=true", "--set", "train.aggregation=trimmed-mean"], "unlearn.compare tries FRU"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_no_results(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("fedunlearn: error: ")
    assert list(tmp_path.iterdir()) == []


def test_malformed_csv_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "ratings.csv"
    data.write_text("user,item,rating\n1,10,5\n1,11,four\n")
    assert main(["run", "--set", "data.dataset=csv", "--set", f"data.path={data}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: rating must be a number, got 'four'" in err  # the file, the line, the value
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


TINY_DATA = (
    '"data.synthetic_users" = 20\n"data.synthetic_items" = 80\n"data.synthetic_interactions" = 10\n'
    '"data.test_negatives" = 30\n"model.dim" = 8\n'
)  # an experiment file's [base] lines for a federation that trains in a second


def test_experiment_writes_one_row_per_setting(tmp_path):
    spec = tmp_path / "exp.toml"
    spec.write_text(
        "[base]\n" + TINY_DATA + '"train.rounds" = 2\n"central.epochs" = 2\n\n'
        '[[setting]]\nname = "fed-mf"\nset = { "model.name" = "mf" }\n\n'
        '[[setting]]\nname = "central-ncf"\nset = { "model.name" = "ncf", "run.mode" = "central" }\n\n'
        '[[setting]]\nname = "popularity"\nset = { "run.mode" = "popularity" }\n'
    )
    out = tmp_path / "exp"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["setting"]) == ["fed-mf", "central-ncf", "popularity"]
    assert {"HR@10", "NDCG@10", "HR@5", "NDCG@20", "seconds"} <= set(table.columns)
    assert table["HR@10"].between(0, 1).all()
    assert (out / "table.md").exists() and (out / "fed-mf" / "final.json").exists()
    again = tmp_path / "again"
    assert main(["experiment", str(spec), "--out", str(again), "--only", "popularity", "--quiet"]) == 0
    rerun = pd.read_csv(again / "table.csv")
    assert list(rerun["setting"]) == ["popularity"] and rerun["HR@10"][0] == table["HR@10"][2]
    assert main(["experiment", str(spec), "--out", str(tmp_path / "none"), "--only", "pop"]) == 2
    assert not (tmp_path / "none").exists()


def test_data_info_prints_counts(capsys):
    assert main(["data", "info", "synthetic"]) == 0
    text = capsys.readouterr().out
    assert "600" in text and "gender" in text


def test_console_script_exit_code_for_unknown_dataset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "data", "info", "movielens-9m"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown dataset 'movielens-9m'" in proc.stderr


def test_unlearning_experiment_compares_every_method_with_retrain(tmp_path):
    spec = tmp_path / "unlearn.toml"
    spec.write_text(
        "seeds = [0, 1]\n[base]\n" + TINY_DATA + '"train.rounds" = 5\n"eval.every" = 5\n"unlearn.drop" = "3,4@4"\n'
        '[[setting]]\nname = "retrain"\nset = { "unlearn.method" = "retrain" }\n'
        '[[setting]]\nname = "federaser"\nset = { "unlearn.method" = "federaser" }\n'
        '[[setting]]\nname = "none"\nset = { "unlearn.method" = "none" }\n'
    )
    out = tmp_path / "u"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and sorted(runs["seed"].unique()) == [0, 1]
    table = pd.read_csv(out / "table.csv").set_index("setting")
    assert list(table.index) == ["retrain", "federaser", "none"]
    for column in ("HR@10", "NDCG@10", "MIA_AUC", "speedup", "history_bytes", "L2_to_retrain", "HR@10_std"):
        assert column in table.columns
    assert table.loc["retrain", "speedup"] == 1.0 and table.loc["retrain", "L2_to_retrain"] == 0.0
    assert table.loc["federaser", "speedup"] > 1.0 and table.loc["federaser", "L2_to_retrain"] > 0.0
    assert table.loc["federaser", "speedup_steps"] > 1.0  # it calibrated checkpoint 3 for half an epoch
    assert table.loc["none", "L2_to_retrain"] > 0.0 and pd.isna(table.loc["none", "speedup"])  # trained nothing
    assert (out / "federaser" / "seed1" / "history.sqlite").exists()
    assert "±" in (out / "table.md").read_text()


def test_repeated_events_give_a_row_each_judged_against_retrains_row_of_that_event(tmp_path):
    spec = tmp_path / "repeated.toml"
    spec.write_text(
        "[base]\n" + TINY_DATA + '"train.rounds" = 6\n"eval.every" = 6\n'
        '"unlearn.drop" = "3@3;4,5@5"\n"train.fraction" = 0.5\n'
        '[[setting]]\nname = "retrain"\nset = { "unlearn.method" = "retrain" }\n'
        '[[setting]]\nname = "federaser"\nset = { "unlearn.method" = "federaser" }\n'
    )
    out = tmp_path / "r"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 0
    runs = pd.read_csv(out / "runs.csv").set_index(["setting", "event"])
    assert sorted(runs.index) == [("federaser", 3), ("federaser", 5), ("retrain", 3), ("retrain", 5)]
    # each event's speedup is over Retrain's cost at that same event (at round 3 FedEraser only
    # replays the stored round-1 updates: no training)
    assert runs.loc[("retrain", 3), "client_epochs"] < runs.loc[("retrain", 5), "client_epochs"]
    retrain, federaser = runs.loc[("retrain", 5)], runs.loc[("federaser", 5)]
    assert federaser["speedup"] == pytest.approx(retrain["client_epochs"] / federaser["client_epochs"])
    assert np.isnan(runs.loc[("federaser", 3), "L2_to_retrain"])  # the unlearned model is kept for the last event
    assert runs.loc[("federaser", 5), "L2_to_retrain"] > 0


def test_experiment_crosses_models_and_parallel_jobs_give_the_same_numbers(tmp_path):
    spec = tmp_path / "exp.toml"
    spec.write_text(
        'models = ["mf", "ncf"]\n[base]\n"data.synthetic_users" = 20\n"data.synthetic_items" = 80\n'
        '"data.synthetic_interactions" = 10\n"data.test_negatives" = 30\n"model.dim" = 8\n"train.rounds" = 2\n'
        '[[setting]]\nname = "fed"\nset = { "train.lr" = 0.05 }\n'
    )
    tables = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--jobs", jobs]) == 0
        tables[jobs] = pd.read_csv(out / "runs.csv")
        assert (out / "fed" / "ncf" / "final.json").exists()
    assert list(tables["1"]["model"]) == ["mf", "ncf"]
    pd.testing.assert_frame_equal(tables["1"].drop(columns="seconds"), tables["2"].drop(columns="seconds"))
    assert tables["1"]["NDCG@10"].nunique() == 2  # the two models really differ


def test_audited_settings_keep_a_row_block_each_in_the_experiment_table(tmp_path):
    """An audited run's rows name its defence in `setting` and the experiment setting in `run`; two
    settings audited under the same defence were once averaged together as one."""
    spec = tmp_path / "exp.toml"
    spec.write_text(
        '[base]\n"data.synthetic_users" = 30\n"data.synthetic_items" = 80\n"data.synthetic_interactions" = 12\n'
        '"data.test_negatives" = 30\n"model.dim" = 8\n"train.rounds" = 2\n"audit.enabled" = true\n'
        '"audit.attackers" = ["mlp"]\n'
        '[[setting]]\nname = "slow"\nset = { "train.lr" = 0.001 }\n'
        '[[setting]]\nname = "fast"\nset = { "train.lr" = 0.05 }\n'
    )
    out = tmp_path / "exp"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 0
    runs, table = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "table.csv")
    assert list(dict.fromkeys(table["run"])) == ["slow", "fast"] and len(table) == len(runs)
    for name in ("slow", "fast"):
        assert table[table["run"] == name]["NDCG@10"].tolist() == runs[runs["run"] == name]["NDCG@10"].tolist()
    assert runs[runs["run"] == "slow"]["NDCG@10"].iloc[0] != runs[runs["run"] == "fast"]["NDCG@10"].iloc[0]


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"fedunlearn {version('fedunlearn')}\n"


def test_tables_show_counts_as_integers_a_missing_value_as_a_dash_and_spread_beside_the_mean():
    from fedunlearn.runs.tables import readable

    table = pd.DataFrame(
        {
            "event": [15.0, 15.0],
            "method": ["retrain", "accum"],
            "HR@10": [0.6, 0.58],
            "HR@10_std": [0.01, np.nan],
            "speedup": [1.0, np.inf],
            "client_epochs": [8232.0, 0.0],
        }
    )
    assert readable(table).splitlines() == [
        "|   event | method   |           HR@10 |   speedup |   client_epochs |",
        "|--------:|:---------|----------------:|----------:|----------------:|",
        "|      15 | retrain  | 0.6000 ± 0.0100 |    1.0000 |            8232 |",
        "|      15 | accum    |          0.5800 |         - |               0 |",
    ]
    over_seeds = pd.DataFrame(  # the best validation round of three seeds: 50, 60, 55 / 60 each
        {"setting": ["a", "b"], "seeds": [3, 3], "round": [55.0, 60.0], "round_std": [5.0, 0.0],
         "HR@10": [0.6, 0.7], "HR@10_std": [0.01, 0.02]}  # fmt: skip
    )
    assert [row.split("|")[3].strip() for row in readable(over_seeds).splitlines()[2:]] == ["55.0 ± 5.0", "60"]
    ratios = pd.DataFrame(  # a ratio every seed agrees on is no count, whatever its mean times the seeds
        {"method": ["a", "b", "c"], "seeds": [2, 2, 1], "speedup": [2.5, 1.5, 3.0], "speedup_std": [0.0, 0.0, np.nan]}
    )
    shown = [row.split("|")[3].strip() for row in readable(ratios).splitlines()[2:]]
    assert shown == ["2.5000 ± 0.0000", "1.5000 ± 0.0000", "3.0000"]
    rounds = pd.DataFrame(  # a round from one seed in a table of several: no "± nan"
        {"method": ["a", "b"], "seeds": [2, 1], "round": [55.5, 60.0], "round_std": [0.7, np.nan]}
    )
    assert [row.split("|")[3].strip() for row in readable(rounds).splitlines()[2:]] == ["55.5 ± 0.7", "60"]


def test_a_run_that_ranks_no_better_than_popularity_is_flagged(tmp_path, capsys):
    untrained = [*TINY, "--set", "train.lr=1e-9", "--set", "train.rounds=1"]  # the initial random model
    assert main(["run", *untrained, "--quiet", "--out", str(tmp_path / "short")]) == 0
    final = json.loads((tmp_path / "short" / "final.json").read_text())
    assert final["metrics"]["HR@10"] <= final["popularity_HR@10"]
    assert "no better than ranking by popularity" in capsys.readouterr().err


def test_summary_is_a_readable_digest_and_the_recorded_config_says_the_audit_ran(tmp_path):
    import tomllib

    out = tmp_path / "run"
    args = ["--set", "defence.method=attrcloak-dd", "--set", "audit.attackers=[mlp]", "--drop-random", "20%@2"]
    assert main(["run", *TINY, *args, "--quiet", "--out", str(out)]) == 0
    assert tomllib.loads((out / "config.toml").read_text())["audit"]["enabled"] is True  # a defence runs the audit
    summary = (out / "summary.md").read_text()
    assert "{'" not in summary and "{\"" not in summary  # no raw Python or JSON records
    assert "defended with attrcloak-dd" in summary and "## Drop events" in summary
    for name in ("metrics.csv", "audit.md", "embeddings.png", "final.json"):
        assert f"[{name}]({name})" in summary and (out / name).exists()


def test_a_defence_runs_when_no_attribute_is_left_to_attack(tmp_path, capsys):
    """Three clients, one leaves: no attribute has two values with two audited clients, so the audit
    table is empty, and the defence still runs and the run ends well (it once read its own row of
    that empty table). With two clients no class holds three, so no attribute is defended (no sum
    over fewer than three clients: fedunlearn.privacy.cells), and the run says so."""
    settings = ["data.synthetic_users=3", "data.synthetic_items=1000", "data.synthetic_interactions=40",
                "data.test_negatives=19", "model.dim=8", "train.rounds=3", "eval.every=3", "unlearn.drop=2@3",
                "unlearn.method=federaser"]  # fmt: skip
    for method in ("d2d-r", "u2u-r"):  # AttrCloak refuses so few clients (singular covariances), in one line
        args = [a for s in [*settings, f"defence.method={method}", "defence.steps=1"] for a in ("--set", s)]
        assert main(["run", *args, "--engine", "inprocess", "--out", str(tmp_path / method), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "not attacked" in err and "so nothing to defend" in err
        info = json.loads((tmp_path / method / "final.json").read_text())
        assert info["defending_clients"] == 0 and info["attributes_not_defended"] == ["gender", "age", "occupation"]


def test_the_console_names_an_upload_defence_beside_an_audit_alone(tmp_path, capsys):
    """'the audit alone, no defence' above a table whose rows say ldp (a user's walk); summary.md
    already named it."""
    settings = [*TINY, "--set", "defence.upload=ldp", "--set", "audit.enabled=true", "--set", "audit.attackers=[mlp]"]
    assert main(["run", *settings, "--quiet", "--out", str(tmp_path / "r")]) == 0
    shown = capsys.readouterr().out
    assert "no post-training defence, the uploads defended with ldp" in shown and "no defence;" not in shown
    assert "the uploads were defended with ldp" in (tmp_path / "r" / "summary.md").read_text()
