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

An experiment with failed runs keeps its finished ones; the others still run, the report covers
what finished, and the command ends with an error naming the failures. `--resume` continues
every experiment (finished runs are read back).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedunlearn.config import read_toml
from fedunlearn.errors import FedUnlearnError
from fedunlearn.runs.experiment import PLAIN_NAME, run_experiment
from fedunlearn.runs.report import write_report
from fedunlearn.runs.tables import readable


@dataclass
class SuiteEntry:
    name: str
    file: Path
    only: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def load_suite(path: str | Path) -> tuple[list[int] | None, list[SuiteEntry]]:
    path = Path(path)
    spec = read_toml(path)
    unknown = set(spec) - {"seeds", "experiment", "title"}
    if unknown:
        raise FedUnlearnError(f"{path}: unknown keys {sorted(unknown)}; use seeds and [[experiment]] tables")
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(type(s) is int for s in seeds)):
        raise FedUnlearnError(f"{path}: seeds must be a list of integers, e.g. seeds = [0, 1, 2]")
    rows = spec.get("experiment", [])
    if not rows or not isinstance(rows, list):
        raise FedUnlearnError(f"{path} lists no [[experiment]]: add at least one (name and file)")
    entries, names = [], set()
    for row in rows:
        name, file = row.get("name"), row.get("file")
        if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or name in names or name == "report":
            raise FedUnlearnError(
                f"{path}: every [[experiment]] needs a unique folder name (not 'report'); got {name!r}"
            )
        if not isinstance(file, str) or not (path.parent / file).is_file():
            raise FedUnlearnError(f"{path}: experiment {name!r} names file {file!r}, which is not there")
        unknown = set(row) - {"name", "file", "only", "set"}
        if unknown:
            raise FedUnlearnError(f"{path}: experiment {name!r} has unknown keys {sorted(unknown)}")
        overrides = [f"{key}={json.dumps(value)}" for key, value in row.get("set", {}).items()]
        entries.append(SuiteEntry(name, path.parent / file, list(row.get("only", [])), overrides))
        names.add(name)
    return seeds, entries


def run_suite(
    path: str | Path, out: str | Path, overrides: list[str] | None = None, show_progress: bool = True,
    jobs: int = 1, resume: bool = False,
) -> dict[str, str]:  # fmt: skip
    """Every experiment, then the report; returns the plots made."""
    seeds, entries = load_suite(path)
    out = Path(out)
    if out.exists() and not resume:
        raise FedUnlearnError(f"suite folder {out} exists: continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for index, entry in enumerate(entries, start=1):
        print(f"suite [{index}/{len(entries)}] {entry.name}: {entry.file.name}", flush=True)
        started = time.perf_counter()
        try:
            again = resume and (out / entry.name).is_dir()
            run_experiment(entry.file, out / entry.name, [*entry.overrides, *(overrides or [])], show_progress,
                           jobs, entry.only or None, resume=again, seeds=seeds)  # fmt: skip
            status = "ok"
        except FedUnlearnError as error:
            status = f"failed: {error}"
            failures.append(f"{entry.name}: {error}")
        rows.append({"experiment": entry.name, "file": entry.file.name, "seconds": time.perf_counter() - started,
                     "status": status})  # fmt: skip
    finished = [out / entry.name for entry in entries if (out / entry.name / "runs.csv").is_file()]
    shutil.rmtree(out / "report", ignore_errors=True)  # rebuilt from the folders every time
    plots = write_report(finished, out / "report") if finished else {}
    total = sum(row["seconds"] for row in rows)
    (out / "suite.md").write_text(
        f"# fedunlearn suite: {Path(path).name}\n\n{readable(pd.DataFrame(rows), digits=1)}\n\n"
        f"Total {total:.0f} s ({total / 60:.1f} min) of experiments; the report: "
        "[report/report.md](report/report.md).\n"
    )
    if failures:
        raise FedUnlearnError(f"{len(failures)} of {len(entries)} experiments had failed runs (see {out}/suite.md); "
                              f"first: {failures[0]}")  # fmt: skip
    return plots
