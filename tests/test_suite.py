"""`fedunlearn suite`: every listed experiment into its folder, one report over them, the wall
time of each; a failing experiment keeps the others and ends with a one-line error."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedunlearn.cli import main
from fedunlearn.config import load_config
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.rounds import sample_clients

BASE = ('[base]\n"data.synthetic_users" = 20\n"data.synthetic_items" = 80\n"data.synthetic_interactions" = 10\n'
        '"data.test_negatives" = 30\n"model.dim" = 8\n"train.rounds" = 2\n')  # fmt: skip


def _suite(tmp_path, second_lr="0.05"):
    (tmp_path / "a.toml").write_text(BASE + '[[setting]]\nname = "fed"\nset = { "train.lr" = 0.01 }\n')
    (tmp_path / "b.toml").write_text(BASE + f'[[setting]]\nname = "fast"\nset = {{ "train.lr" = {second_lr} }}\n')
    (tmp_path / "suite.toml").write_text(
        'seeds = [0, 1]\n[[experiment]]\nname = "first"\nfile = "a.toml"\n'
        '[[experiment]]\nname = "second"\nfile = "b.toml"\nset = { "model.dim" = 4 }\n'
    )
    return tmp_path / "suite.toml"


def test_a_suite_runs_each_experiment_with_its_seeds_and_reports_them_together(tmp_path):
    out = tmp_path / "out"
    assert main(["suite", str(_suite(tmp_path)), "--out", str(out), "--quiet"]) == 0
    for name, setting in (("first", "fed"), ("second", "fast")):
        runs = pd.read_csv(out / name / "runs.csv")
        assert sorted(runs["seed"]) == [0, 1]  # the suite's seeds
        assert (out / name / setting / "seed1" / "final.json").is_file()
    assert "dim = 4" in (out / "second" / "fast" / "seed0" / "config.toml").read_text()  # the experiment's set
    report = (out / "report" / "report.md").read_text()
    values = [json.loads((out / "first" / "fed" / f"seed{s}" / "final.json").read_text())["metrics"]["HR@10"]
              for s in (0, 1)]  # fmt: skip
    row = next(line for line in report.splitlines() if line.startswith("| first/fed "))
    assert f"| {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} |" in row
    suite = (out / "suite.md").read_text()
    assert "| first " in suite and "| second " in suite and "Total" in suite


def test_a_failing_experiment_keeps_the_others_and_ends_with_one_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", str(_suite(tmp_path, second_lr="1e30")), "--out", str(out), "--quiet"]) == 2  # diverges
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedunlearn: error:")]
    assert len(errors) == 1 and "1 of 2 experiments and benchmarks failed" in errors[0] and "diverged" in errors[0]
    assert (out / "first" / "runs.csv").is_file() and (out / "report" / "report.md").is_file()
    assert "failed" in (out / "suite.md").read_text()
    assert "second/" not in (out / "report" / "report.md").read_text()  # an experiment with a failed run: not reported


def test_a_suite_with_a_bad_setting_is_refused_before_it_writes_anything(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", str(_suite(tmp_path, second_lr="-1.0")), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedunlearn: error:")]
    assert len(errors) == 1 and "train.lr" in errors[0] and not out.exists()


def test_a_setting_that_can_only_fail_is_refused_before_any_run_trains(tmp_path, capsys):
    """A drop event past the end (or a missing data file) in a later setting was said only after
    every earlier setting had trained, leaving tables of a half experiment (a review)."""
    suite = _suite(tmp_path)
    (tmp_path / "b.toml").write_text(BASE + '[[setting]]\nname = "late"\nset = { "unlearn.drop" = "5@9" }\n')
    out = tmp_path / "out"
    assert main(["suite", str(suite), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedunlearn: error:")]
    assert len(errors) == 1 and "second/late/seed0: drop event '5@9'" in errors[0] and not out.exists()
    assert main(["experiment", str(tmp_path / "b.toml"), "--out", str(out), "--quiet"]) == 2
    assert "late: drop event '5@9'" in capsys.readouterr().err and not out.exists()


def test_suite_resume_refuses_a_folder_it_did_not_write_and_entries_that_are_not_tables(tmp_path, capsys):
    """--resume wrote into any folder and deleted its report/ (a review); a list of file names where
    [[experiment]] tables belong raised AttributeError."""
    other = tmp_path / "other"
    (other / "report").mkdir(parents=True)
    (other / "report" / "notes.md").write_text("mine")
    assert main(["suite", str(_suite(tmp_path)), "--out", str(other), "--quiet", "--resume"]) == 2
    assert "holds no run of this suite" in capsys.readouterr().err
    assert (other / "report" / "notes.md").read_text() == "mine" and [p.name for p in other.iterdir()] == ["report"]
    for table in ("experiment", "benchmark"):
        (tmp_path / "bad.toml").write_text(f'{table} = ["a.toml"]\n')
        assert main(["suite", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert f"{table} must be [[{table}]] tables" in capsys.readouterr().err


ENGINES = Path(__file__).resolve().parents[1] / "benchmarks" / "engines.py"


def test_a_suite_benchmark_writes_its_tables_and_the_report_shows_them_with_the_scalability_plot(tmp_path):
    (tmp_path / "suite.toml").write_text(
        f'[[benchmark]]\nname = "scalability"\nscript = "{ENGINES}"\n'
        'args = ["--engines", "", "--sizes", "60,120", "--big-rounds", "3", "--set", "model.dim=4"]\n'
    )
    out = tmp_path / "out"
    assert main(["suite", str(tmp_path / "suite.toml"), "--out", str(out), "--quiet"]) == 0
    scaling = pd.read_csv(out / "scalability" / "scaling.csv")
    assert list(scaling["clients"]) == [60, 120] and (scaling["s per round"] > 0).all()
    assert not (out / "scalability" / "engines.csv").exists()  # --engines '': no ML-100K table
    report = (out / "report" / "report.md").read_text()
    assert "## scalability: scaling" in report
    section = report.split("## scalability: scaling")[1].split("##")[0]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line[:2] == "| "]
    assert cells[0] == list(scaling.columns)  # the report's table is the benchmark's CSV
    at = {name: position for position, name in enumerate(cells[0])}
    for shown, (_, row) in zip(cells[1:], scaling.iterrows(), strict=True):
        for name in ("clients", "rounds", "torch threads", "peak RSS MiB"):
            assert int(shown[at[name]]) == row[name], name
        config = load_config(None, [f"data.synthetic_users={row['clients']}", "data.synthetic_items=1000"])
        ids = build_federation(config.data, config.run.seed).client_ids  # round 2 is the one timed of 3
        timed = sample_clients(config.run.training_seed(), 2, ids, 0.1)
        assert float(shown[at["clients/round"]]) == row["clients/round"] == len(timed)
        assert float(shown[at["s per round"]]) == round(row["s per round"], 4)
    png = (out / "report" / "scalability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000 and "scalability.png" in report


def test_a_failing_benchmark_leaves_no_folder_and_ends_with_one_error(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "suite.toml").write_text('[[benchmark]]\nname = "speed"\nscript = "broken.py"\n')
    out = tmp_path / "out"
    assert main(["suite", str(tmp_path / "suite.toml"), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedunlearn: error:")]
    assert len(errors) == 1 and "1 of 1 experiments and benchmarks failed" in errors[0] and "exited with 3" in errors[0]
    assert not (out / "speed").exists() and "failed" in (out / "suite.md").read_text()


def test_resume_keeps_a_finished_benchmark_and_reruns_a_missing_one(tmp_path):
    (tmp_path / "bench.py").write_text(
        "import sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'speed.csv').write_text('clients,seconds\\n10,0.5\\n')\n"
        "(out / 'benchmark.md').write_text('done\\n')\n"
        "with open(pathlib.Path(__file__).with_name('calls.txt'), 'a') as log:\n"
        "    log.write(out.name + '\\n')\n"
    )
    (tmp_path / "suite.toml").write_text(
        '[[benchmark]]\nname = "a"\nscript = "bench.py"\n[[benchmark]]\nname = "b"\nscript = "bench.py"\n'
    )
    out = tmp_path / "out"
    assert main(["suite", str(tmp_path / "suite.toml"), "--out", str(out), "--quiet"]) == 0
    (out / "b" / "benchmark.md").unlink()  # b as if killed before it finished
    assert main(["suite", str(tmp_path / "suite.toml"), "--out", str(out), "--quiet", "--resume"]) == 0
    assert (tmp_path / "calls.txt").read_text().split() == ["a", "b", "b"]
    report = (out / "report" / "report.md").read_text()
    assert "## a: speed" in report and "## b: speed" in report


def test_a_resumed_suite_keeps_the_seconds_its_experiments_took_before(tmp_path):
    out = tmp_path / "out"
    assert main(["suite", str(_suite(tmp_path)), "--out", str(out), "--quiet"]) == 0
    first = pd.read_csv(out / "suite.csv").set_index("experiment")["seconds"]
    assert (first > 0).all()
    assert main(["suite", str(_suite(tmp_path)), "--out", str(out), "--quiet", "--resume"]) == 0
    again = pd.read_csv(out / "suite.csv").set_index("experiment")["seconds"]
    assert (again >= first).all()  # the first call's time kept, the resumed (read-back) call's added


def test_a_suite_stopped_in_a_step_keeps_the_seconds_of_the_steps_before(tmp_path, monkeypatch):
    import fedunlearn.runs.suite as suite

    real, calls = suite.run_experiment, []

    def stopped_in_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "run_experiment", stopped_in_the_second)
    out = tmp_path / "out"
    assert main(["suite", str(_suite(tmp_path)), "--out", str(out), "--quiet"]) == 130
    first = pd.read_csv(out / "suite.csv").set_index("experiment")["seconds"]
    assert list(first.index) == ["first", "second"] and first["first"] > 0  # saved before the stop
    monkeypatch.setattr(suite, "run_experiment", real)
    assert main(["suite", str(_suite(tmp_path)), "--out", str(out), "--quiet", "--resume"]) == 0
    again = pd.read_csv(out / "suite.csv").set_index("experiment")["seconds"]
    assert again["first"] >= first["first"]  # the first call's time kept under the read-back


def test_a_suite_killed_in_its_first_benchmark_resumes(tmp_path, capsys):
    """kill -9 in the first benchmark of a benchmark-only suite left out/<benchmark>/ and no
    suite.csv: --resume said the folder held no run of this suite, and a call without --resume that
    it existed (a review)."""
    (tmp_path / "bench.py").write_text("import sys\n")
    (tmp_path / "suite.toml").write_text('[[benchmark]]\nname = "slow"\nscript = "bench.py"\n')
    out = tmp_path / "out"
    (out / "slow").mkdir(parents=True)  # what the killed suite left (its script had begun writing)
    (out / "slow" / "t.csv").write_text("a\n1\n")
    main(["suite", str(tmp_path / "suite.toml"), "--out", str(out), "--quiet", "--resume"])
    shown = capsys.readouterr()
    assert "holds no run of this suite" not in shown.err and "suite [1/1] slow: bench.py" in shown.out  # ran again
