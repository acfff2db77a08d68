"""`fedunlearn report`: report.md, report.html and the plots, on a tiny run and a 2-seed experiment;
the tables in report.md must equal the folders' own metrics files."""

import json
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from fedunlearn.cli import main
from fedunlearn.runs.report import _speedups_now, short_names

TINY = ["data.synthetic_users=40", "data.synthetic_items=120", "data.synthetic_interactions=15",
        "data.test_negatives=40", "model.dim=8", "train.rounds=4", "eval.every=1", "audit.attackers=[mlp]"]  # fmt: skip
PLOTS = {"rounds.png", "unlearning_tradeoff.png", "unlearning_forgetting.png", "privacy_tradeoff.png",
         "audit_views.png", "embeddings.png", "time.png"}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    settings = [f"--set={item}" for item in TINY]
    run = ["run", *settings, "--drop-random", "10%@3", "--set", "unlearn.compare=true", "--set", "unlearn.poison=true",
           "--set", "audit.enabled=true", "--set", "defence.method=attrcloak-dd", "--quiet"]  # fmt: skip
    assert main([*run, "--out", str(root / "run")]) == 0
    spec = root / "exp.toml"
    base = "".join(f'"{key}" = {value}\n' for key, value in (item.split("=", 1) for item in TINY[:-1]))
    spec.write_text(
        f'seeds = [0, 1]\n[base]\n{base}"unlearn.drop_random" = "10%@3"\n'
        '[[setting]]\nname = "retrain"\nset = { "unlearn.method" = "retrain" }\n'
        '[[setting]]\nname = "federaser"\nset = { "unlearn.method" = "federaser" }\n'
    )
    assert main(["experiment", str(spec), "--out", str(root / "exp"), "--quiet"]) == 0
    return root


def _table(markdown: str, title: str) -> pd.DataFrame:
    """The markdown table under `## title`, as text cells."""
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(rows[2:], columns=rows[0])


def _check_plots(out, expected):
    for name in expected:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500, name  # a real figure, not an empty canvas
        assert (out / name).stat().st_size > 15_000 and image.std() > 0.05, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(expected)  # self-contained: every plot inside


def test_a_run_report_has_every_plot_and_its_tables_equal_the_runs_files(folders, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(folders / "run"), "--out", str(out)]) == 0
    _check_plots(out, PLOTS)
    markdown = (out / "report.md").read_text()
    final = json.loads((folders / "run" / "final.json").read_text())
    quality = _table(markdown, "Recommendation quality")
    assert quality.loc[0, "HR@10"] == f"{final['metrics']['HR@10']:.4f}"
    assert quality.loc[0, "NDCG@10"] == f"{final['metrics']['NDCG@10']:.4f}"
    assert quality.loc[0, "defence"] == "before attrcloak-dd" and quality.loc[0, "dataset"] == "synthetic"
    assert "before attrcloak-dd moved the user parts" in (folders / "run" / "summary.md").read_text()
    unlearning = _table(markdown, "Unlearning, judged against Retrain").set_index("method")
    saved = pd.read_csv(folders / "run" / "unlearning.csv").set_index("method")
    for method in saved.index:
        for column in ("HR@10", "ER@10", "MIA_AUC"):
            assert unlearning.loc[method, column] == f"{saved.loc[method, column]:.4f}", (method, column)
    privacy = _table(markdown, "Attribute privacy (global audit on the embeddings)")
    audit = pd.read_csv(folders / "run" / "audit.csv")
    seen = audit[(audit["audit"] == "global") & (audit["view"] == "embedding")]
    assert [f"{v:.4f}" for v in seen["balanced_accuracy"]] == list(privacy["balanced_accuracy"])
    for name in PLOTS:
        assert f"[{name}]({name})" in markdown
    rounds = pd.read_csv(folders / "run" / "metrics.csv")  # `seconds`: time since the loop started
    first, last = rounds.iloc[0], rounds.iloc[-1]
    per_round = (last["seconds"] - first["seconds"]) / (last["round"] - first["round"])
    assert _table(markdown, "Time").loc[0, "seconds_per_round"] == f"{per_round:.4f}"


def test_an_experiment_report_shows_mean_and_std_over_seeds_beside_a_run(folders, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(folders / "exp"), str(folders / "run"), "--out", str(out)]) == 0
    _check_plots(out, PLOTS)
    quality = _table((out / "report.md").read_text(), "Recommendation quality").set_index("run")
    for method in ("retrain", "federaser"):
        values = [json.loads((folders / "exp" / method / f"seed{s}" / "final.json").read_text())["metrics"]["HR@10"]
                  for s in (0, 1)]  # fmt: skip
        assert quality.loc[f"exp/{method}", "HR@10"] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
        assert quality.loc[f"exp/{method}", "seeds"] == "2"
    unlearning = _table((out / "report.md").read_text(), "Unlearning, judged against Retrain")
    runs = pd.read_csv(folders / "exp" / "runs.csv")
    fed = unlearning[(unlearning["run"] == "exp") & (unlearning["method"] == "federaser")]
    expected = runs[runs["method"] == "federaser"]["MIA_AUC"]
    assert fed["MIA_AUC"].item() == f"{expected.mean():.4f} ± {expected.std():.4f}"


def test_report_refuses_a_folder_that_is_no_results_folder_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(r"fedunlearn: error: .*empty is neither a finished run folder.*", error)
    assert not out.exists() and not (tmp_path / "report.partial").exists()


def test_report_never_writes_over_an_existing_folder(folders, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    assert main(["report", str(folders / "run"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and not any(out.iterdir())


def test_the_report_takes_speedups_again_by_todays_rule_from_each_rows_costs():
    base = {"run": "unlearning", "model": "ncf", "seed": 0, "event": 10}
    rows = pd.DataFrame([
        base | {"method": "retrain", "client_epochs": 90.0, "optimizer_steps": 180, "unlearn_seconds": 13.0},
        base | {"method": "none", "client_epochs": 0.0, "optimizer_steps": 0, "unlearn_seconds": 0.013,
                "speedup_time": 1000.0},  # written under the old 0.01 s floor
        base | {"method": "fru", "client_epochs": 9.0, "optimizer_steps": 90, "unlearn_seconds": 6.5},
    ])  # fmt: skip
    again = _speedups_now(rows).set_index("method")
    assert np.isnan(again.loc["none", "speedup_time"])
    assert again.loc["fru", ["speedup", "speedup_steps", "speedup_time"]].tolist() == [10.0, 2.0, 2.0]


def test_run_names_lose_only_the_folder_path_they_all_share():
    names = pd.Series(["attribute/trained/mf", "attribute/trained/ncf", "attribute/trained/mf"])
    assert list(short_names(names)) == ["mf", "ncf", "mf"]
    assert list(short_names(pd.Series(["a/x", "b/x"]))) == ["a/x", "b/x"]  # nothing shared: kept whole
    assert list(short_names(pd.Series(["only/one"]))) == ["only/one"]  # a single run keeps its name


def test_a_mixed_experiment_reports_only_event_rows_as_unlearning_and_same_named_runs_must_match(tmp_path, capsys):
    """An experiment with a setting without a drop (and an audited one) beside its drop settings
    crashed the report (a NaN event in the plot labels) or, past that, listed the plain run's final
    HR@10 and the audit rows as unlearning rows ("36 seeds"). Two unrelated runs in folders of the
    same name were averaged as two seeds of one."""
    from fedunlearn.runs.report import collect, unlearning_rows

    base = "".join(f'"{key}" = {value}\n' for key, value in (item.split("=", 1) for item in TINY[:-1]))
    (tmp_path / "mixed.toml").write_text(
        f"[base]\n{base}"
        '[[setting]]\nname = "plain"\n'
        '[[setting]]\nname = "audited"\nset = { "audit.enabled" = true, "audit.attackers" = ["mlp"] }\n'
        '[[setting]]\nname = "retrain"\nset = { "unlearn.method" = "retrain", "unlearn.drop_random" = "10%@3" }\n'
        '[[setting]]\nname = "none"\nset = { "unlearn.method" = "none", "unlearn.drop_random" = "10%@3" }\n'
        '[[setting]]\nname = "audited-none"\nset = { "unlearn.method" = "none", "unlearn.drop_random" = "10%@3", '
        '"audit.enabled" = true, "audit.attackers" = ["mlp"] }\n'
    )  # the audited run with a drop kept only its audit rows: its event was lost
    assert main(["experiment", str(tmp_path / "mixed.toml"), "--out", str(tmp_path / "mixed"), "--quiet"]) == 0
    rows = unlearning_rows(collect([tmp_path / "mixed"]))
    assert sorted(rows["method"]) == ["none", "none", "retrain"] and rows["retrain_key"].nunique() == 1
    assert main(["report", str(tmp_path / "mixed"), "--out", str(tmp_path / "r")]) == 0
    unlearning = _table((tmp_path / "r" / "report.md").read_text(), "Unlearning, judged against Retrain")
    assert sorted(unlearning["method"]) == ["none", "none", "retrain"]
    for seed, lr in ((0, "0.01"), (1, "0.02")):
        settings = [f"--set={item}" for item in TINY[:-1]] + [f"--set=run.seed={seed}", f"--set=train.lr={lr}"]
        assert main(["run", *settings, "--quiet", "--out", str(tmp_path / f"g{seed}" / "myrun")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "g0" / "myrun"), str(tmp_path / "g1" / "myrun"), "--out",
                 str(tmp_path / "r2")]) == 2  # fmt: skip
    assert "share the name 'myrun' but differ in train.lr" in capsys.readouterr().err


def test_an_experiment_with_an_unfinished_run_is_refused(folders, tmp_path, capsys):
    """A resume killed part-way leaves runs.csv of the earlier runs beside a finished run it does not
    list and a partial one: the report read the folders and runs.csv apart and rendered both."""
    import shutil

    copy = tmp_path / "exp"
    shutil.copytree(folders / "exp", copy)
    (copy / "federaser" / "seed2.partial").mkdir()
    capsys.readouterr()
    assert main(["report", str(copy), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "unfinished runs (federaser/seed2.partial)" in error and error.count("\n") == 1
    assert not (tmp_path / "r").exists()


CUT_AUDITS = ["", "defence,view\n", "defence,view,attacker,attribute,audit\nnone,embedding,mlp\n"]


@pytest.mark.parametrize("damage", CUT_AUDITS)
def test_a_damaged_side_file_is_a_one_line_error(folders, tmp_path, capsys, damage):
    """An empty or cut audit.csv gave a pandas traceback, or a table row of '-' and exit 0."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(folders / "run", copy)
    (copy / "audit.csv").write_text(damage if damage else "x\n\"")
    capsys.readouterr()
    assert main(["report", str(copy), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "audit.csv is damaged" in error and error.count("\n") == 1 and not (tmp_path / "r").exists()


def test_a_defence_without_an_audit_shows_its_after_figures_where_the_audit_table_would(tmp_path):
    """On Flower a defence without the audit leaves no audit table: the summary pointed to it and
    the report's note to a privacy table that did not exist (a review). Its clients' figures after
    the defence (final.json's `defence`) are in the summary and beside the quality row."""
    from fedunlearn.config import load_config
    from fedunlearn.fl.rounds import FederationResult
    from fedunlearn.runs.report import RunFolder, quality_table
    from fedunlearn.runs.results import summary_markdown

    config = load_config(None, ["run.engine=flower", "defence.method=attrcloak-dd"])
    result = FederationResult()
    result.final = {"HR@10": 0.5, "NDCG@10": 0.3}
    defence = {"method": "attrcloak-dd", "HR@10": 0.4123, "NDCG@10": 0.2071, "NDCG@10_before": 0.3}
    info = {"clients": 10, "items": 5, "seconds": 1.0, "defence": defence}
    text = summary_markdown(tmp_path, config, result, info)
    assert "audit table" not in text and "HR@10 0.4123, NDCG@10 0.2071" in text
    final = {"metrics": result.final, "mode": "federated", "engine": "flower", "clients": 10, "seconds": 1.0}
    runs = [RunFolder(group, 0, tmp_path, final | extra, config.to_dict(), pd.DataFrame(), None)
            for group, extra in (("unaudited", {"defence": defence}), ("audited", {}))]  # fmt: skip
    after = quality_table(runs).set_index("run")["NDCG@10_after_defence"]
    assert after["unaudited"] == 0.2071 and np.isnan(after["audited"])


def test_the_summary_says_when_a_defence_took_no_step_and_when_none_ran(tmp_path):
    """'400 clients defended with attrcloak-dd (0.1 s)' for a defence that took no step and left every
    embedding as trained (a single-class attribute: a review); an audit alone said '0 clients
    defended with none'."""
    from fedunlearn.config import load_config
    from fedunlearn.fl.rounds import FederationResult
    from fedunlearn.runs.results import summary_markdown

    result = FederationResult()
    result.final = {"HR@10": 0.5, "NDCG@10": 0.3}
    base = {"clients": 10, "items": 5, "seconds": 1.0, "defending_clients": 400, "defence_seconds": 0.1}

    def privacy(settings, **info):
        text = summary_markdown(tmp_path, load_config(None, settings), result, base | info)
        return text.split("## Attribute privacy\n\n", 1)[1].split("\n", 1)[0]

    dd = ["defence.method=attrcloak-dd"]
    assert privacy(dd, defence_steps=0).startswith("attrcloak-dd on 400 clients took no step")
    assert privacy(dd, defence_steps=7) == "400 clients defended with attrcloak-dd (7 steps, 0.1 s)."
    assert privacy([], defending_clients=0) == "The audit alone, no post-training defence."
    assert privacy(["defence.upload=ldp"], defending_clients=0) == (
        "The audit alone, no post-training defence; the uploads were defended with ldp (audit.csv's defence column)."
    )


def test_the_metrics_heading_names_the_round_a_best_valid_run_scored_not_final():
    """Found by an independent check: with eval.select = best_valid, round 6 of 10 was shown under
    "Final metrics" (summary.md) and "final round" (report.md), with no round anywhere but final.json."""
    from fedunlearn.config import load_config
    from fedunlearn.runs.results import final_heading

    best = load_config(None, ['eval.select="best_valid"'])
    assert final_heading(best, {"round": 6}) == (
        "## Metrics of round 6 (eval.select = best_valid: the best validation HR@10, not the last round)"
    )
    assert final_heading(load_config(None, []), {"round": 10}) == "## Final metrics (round 10)"


def test_a_method_has_the_same_colour_in_both_unlearning_plots(tmp_path, monkeypatch):
    """Found by an independent check: FedEraser was orange in unlearning_tradeoff.png and blue in
    unlearning_forgetting.png (the second left Retrain out before giving colours)."""
    import matplotlib.axes

    from fedunlearn.runs.plots import plot_forgetting, plot_unlearning

    table = pd.DataFrame({"run": "r", "model": "mf", "event": 5, "seed": 0, "method": ["retrain", "federaser", "fru"],
                          "HR@10": [0.5, 0.49, 0.48], "MIA_AUC": [0.5, 0.52, 0.51], "speedup": [1.0, 4.0, 8.0],
                          "speedup_time": [1.0, 3.0, 2.0]})  # fmt: skip
    seen: list[tuple[str, str]] = []
    original = matplotlib.axes.Axes.scatter

    def record(self, x, y, *args, **kwargs):
        seen.append((kwargs.get("label", ""), kwargs["color"]))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", record)
    plot_unlearning(table, tmp_path / "tradeoff.png")
    tradeoff = {label: colour for label, colour in seen if label}
    seen.clear()
    plot_forgetting(table, tmp_path / "forgetting.png")
    assert [colour for _, colour in seen] == [tradeoff["federaser"], tradeoff["fru"]]  # drawn in method order
