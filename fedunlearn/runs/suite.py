"""`fedunlearn suite SUITE.toml --out DIR`: every experiment a suite file lists, each into
`DIR/<name>`, then one report over all of them in `DIR/report` and the wall time of each in
`DIR/suite.md`.

Suite file:

    seeds = [0, 1, 2]                   # optional: every experiment runs these seeds (else its own)
    [[experiment]]
    name = "quality"                    # its folder, DIR/quality
    file = "quality_ml100k.toml"        # an experiment file, relative to the suite file
    only = ["federated-mf"]             # optional: just these settings
    set = { "run.engine" = "batched" }  # optional: overrides for this experiment
    [[benchmark]]
    name = "scalability"                # its folder, DIR/scalability
    script = "../benchmarks/engines.py" # a script that takes --out FOLDER (relative to the suite file)
    args = ["--rounds", "6"]            # optional: its other arguments

Benchmarks run after the experiments, each as its own process (its tables as CSV files and
benchmark.md in its folder; the report shows every table, and a scalability plot for engines.py's).
An experiment with failed runs keeps its finished ones; the others still run, the report covers
what finished, and the command ends with an error naming the failures. `--resume` continues
every experiment (finished runs are read back).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedunlearn.config import read_toml
from fedunlearn.errors import FedUnlearnError
from fedunlearn.runs.experiment import PLAIN_NAME, check_before_running, load_settings, run_experiment
from fedunlearn.runs.report import BENCHMARK_DONE, failed_runs, is_benchmark, write_report
from fedunlearn.runs.results import FINAL
from fedunlearn.runs.tables import readable


@dataclass
class SuiteEntry:
    name: str
    file: Path
    only: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class SuiteBenchmark:
    name: str
    script: Path
    args: list[str] = field(default_factory=list)


def _folder_name(path: Path, kind: str, name: Any, names: set[str]) -> str:
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or name in names or name == "report":
        raise FedUnlearnError(f"{path}: every [[{kind}]] needs a unique folder name (not 'report'); got {name!r}")
    names.add(name)
    return name


def load_benchmarks(path: Path, rows: Any, names: set[str]) -> list[SuiteBenchmark]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise FedUnlearnError(f"{path}: benchmark must be [[benchmark]] tables (name, script, args)")
    benchmarks = []
    for row in rows:
        name = _folder_name(path, "benchmark", row.get("name"), names)
        script, args = row.get("script"), row.get("args", [])
        if not isinstance(script, str) or not (path.parent / script).is_file():
            raise FedUnlearnError(f"{path}: benchmark {name!r} names script {script!r}, which is not there")
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise FedUnlearnError(f"{path}: benchmark {name!r}: args must be a list of strings")
        unknown = set(row) - {"name", "script", "args"}
        if unknown:
            raise FedUnlearnError(f"{path}: benchmark {name!r} has unknown keys {sorted(unknown)}")
        benchmarks.append(SuiteBenchmark(name, path.parent / script, args))
    return benchmarks


def load_suite(path: str | Path) -> tuple[list[int] | None, list[SuiteEntry], list[SuiteBenchmark]]:
    path = Path(path)
    spec = read_toml(path)
    unknown = set(spec) - {"seeds", "experiment", "benchmark", "title"}
    if unknown:
        raise FedUnlearnError(
            f"{path}: unknown keys {sorted(unknown)}; use seeds, [[experiment]] and [[benchmark]] tables"
        )
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(type(s) is int for s in seeds)):
        raise FedUnlearnError(f"{path}: seeds must be a list of integers, e.g. seeds = [0, 1, 2]")
    rows = spec.get("experiment", [])
    if not isinstance(rows, list) or not (rows or spec.get("benchmark")):
        raise FedUnlearnError(f"{path} lists no [[experiment]] nor [[benchmark]]: add at least one")
    entries: list[SuiteEntry] = []
    names: set[str] = set()
    if not all(isinstance(row, dict) for row in rows):
        raise FedUnlearnError(f"{path}: experiment must be [[experiment]] tables (name, file, only, set)")
    for row in rows:
        name, file = _folder_name(path, "experiment", row.get("name"), names), row.get("file")
        if not isinstance(file, str) or not (path.parent / file).is_file():
            raise FedUnlearnError(f"{path}: experiment {name!r} names file {file!r}, which is not there")
        unknown = set(row) - {"name", "file", "only", "set"}
        if unknown:
            raise FedUnlearnError(f"{path}: experiment {name!r} has unknown keys {sorted(unknown)}")
        only, settings = row.get("only", []), row.get("set", {})
        if not isinstance(settings, dict) or not (isinstance(only, list) and all(isinstance(o, str) for o in only)):
            raise FedUnlearnError(f"{path}: experiment {name!r} needs set = {{...}} a table and only = [...] a list "
                                  'of setting names, e.g. only = ["federated-mf"]')  # fmt: skip
        overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        entries.append(SuiteEntry(name, path.parent / file, list(row.get("only", [])), overrides))
    return seeds, entries, load_benchmarks(path, spec.get("benchmark", []), names)


def _complete(experiment: Path) -> bool:
    return (experiment / "runs.csv").is_file() and failed_runs(experiment).empty


def run_benchmark(benchmark: SuiteBenchmark, folder: Path, show_progress: bool) -> str:
    """Its own process, tables into `folder` (stdout, which repeats them, dropped; its progress on
    stderr shown): 'ok', or why not."""
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, str(benchmark.script), *benchmark.args, "--out", str(folder)]
    stderr = None if show_progress else subprocess.DEVNULL
    code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr, check=False).returncode
    if code == 0 and is_benchmark(folder):
        return "ok"
    shutil.rmtree(folder, ignore_errors=True)  # nothing half-written that could read as a result
    return f"failed: {benchmark.script.name} exited with {code}" if code else f"failed: it wrote no {BENCHMARK_DONE}"


def run_suite(
    path: str | Path, out: str | Path, overrides: list[str] | None = None, show_progress: bool = True,
    jobs: int = 1, resume: bool = False,
) -> dict[str, str]:  # fmt: skip
    """Every experiment, then the report; returns the plots made."""
    seeds, entries, benchmarks = load_suite(path)
    out = Path(out)
    times = out / "suite.csv"  # each step's seconds over every call, so a resumed suite keeps the earlier ones
    if out.exists() and not resume:
        raise FedUnlearnError(f"suite folder {out} exists: continue it with --resume or choose another --out")
    if jobs < 1:
        raise FedUnlearnError(f"--jobs is {jobs} but must be at least 1")
    ours = times.is_file() or any((out / step.name).is_dir() for step in [*entries, *benchmarks])
    if resume and not (ours or (out.is_dir() and not any(out.iterdir()))):  # empty: stopped before its first step
        raise FedUnlearnError(f"{out} holds no run of this suite to resume: run without --resume first")
    for entry in entries:  # every experiment's settings checked before anything is written
        settings = load_settings(entry.file, [*entry.overrides, *(overrides or [])], entry.only or None, seeds,
                                 f"{path}'s seeds")  # fmt: skip
        check_before_running([(f"{entry.name}/{name}", config) for name, config in settings
                              if not (out / entry.name / name / FINAL).is_file()])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    before = pd.read_csv(times).set_index("experiment")["seconds"].to_dict() if resume and times.is_file() else {}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    steps = len(entries) + len(benchmarks)
    def record(name: str, file: str, started: float, status: str) -> None:
        """A step's seconds (this call's plus the earlier calls'), saved at once: a suite stopped in
        its next step still has them for --resume."""
        rows.append({"experiment": name, "file": file, "seconds": time.perf_counter() - started + before.get(name, 0.0),
                     "status": status})  # fmt: skip
        seconds = before | {row["experiment"]: row["seconds"] for row in rows}
        pd.DataFrame({"experiment": list(seconds), "seconds": list(seconds.values())}).to_csv(times, index=False)

    for index, entry in enumerate(entries, start=1):
        print(f"suite [{index}/{steps}] {entry.name}: {entry.file.name}", flush=True)
        started, status = time.perf_counter(), "interrupted"
        try:
            again = resume and (out / entry.name).is_dir()
            run_experiment(entry.file, out / entry.name, [*entry.overrides, *(overrides or [])], show_progress,
                           jobs, entry.only or None, again, seeds, f"{path}'s seeds")  # fmt: skip
            status = "ok"
        except FedUnlearnError as error:
            status = f"failed: {error}"
            failures.append(f"{entry.name}: {error}")
        finally:
            record(entry.name, entry.file.name, started, status)
    for index, benchmark in enumerate(benchmarks, start=len(entries) + 1):
        print(f"suite [{index}/{steps}] {benchmark.name}: {benchmark.script.name}", flush=True)
        started, folder, status = time.perf_counter(), out / benchmark.name, "interrupted"
        try:
            status = "ok" if resume and is_benchmark(folder) else run_benchmark(benchmark, folder, show_progress)
        finally:
            record(benchmark.name, benchmark.script.name, started, status)
        if status != "ok":
            failures.append(f"{benchmark.name}: {status}")
    finished = [out / entry.name for entry in entries if _complete(out / entry.name)]  # a failed run: not reported
    finished += [out / benchmark.name for benchmark in benchmarks if is_benchmark(out / benchmark.name)]
    for folder in (out / "report", out / "report.partial"):  # the suite's own report, rebuilt every time
        shutil.rmtree(folder, ignore_errors=True)
    plots = write_report(finished, out / "report") if finished else {}
    total = sum(row["seconds"] for row in rows)
    (out / "suite.md").write_text(
        f"# fedunlearn suite: {Path(path).name}\n\n{readable(pd.DataFrame(rows), digits=1)}\n\n"
        f"Total {total:.0f} s ({total / 60:.1f} min) of experiments and benchmarks (over every call, "
        "--resume included); the report: "
        "[report/report.md](report/report.md).\n"
    )
    if failures:
        raise FedUnlearnError(f"{len(failures)} of {steps} experiments and benchmarks failed (see {out}/suite.md); "
                              f"first: {failures[0]}")  # fmt: skip
    return plots
