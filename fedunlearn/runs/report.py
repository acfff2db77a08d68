"""`fedunlearn report RUN_OR_EXPERIMENT_DIR... --out DIR`: report.md, a self-contained report.html
and the PNG plots of one or more finished results folders, side by side.

A run folder (final.json) is one run; an experiment folder (runs.csv) holds one run folder per
setting, model and seed. Runs that differ only by seed form one group: tables show the mean ± std
over its seeds, and plots its mean (with the band between its lowest and highest seed). Every
number comes from the folders' own files (final.json, metrics.csv, unlearning.csv or runs.csv,
audit.csv, central_view_embeddings.npz); nothing is trained again."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedunlearn.config import differing_keys
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.comparison import compare_with_retrain
from fedunlearn.runs.experiment import summarize
from fedunlearn.runs.plots import (
    plot_audit_views,
    plot_embeddings,
    plot_forgetting,
    plot_rounds,
    plot_scalability,
    plot_time,
    plot_tradeoff,
    plot_unlearning,
)
from fedunlearn.runs.results import EMBEDDINGS_FILE, FINAL, LOCK, read_central_view, saved_attributes
from fedunlearn.runs.tables import audit_columns, readable, readable_cells

SEED_FOLDER = re.compile(r"(?:^|/)seed\d+$")  # a seed folder, not a name ending in "seed1"
AUDIT_KEYS = ("defence", "view", "attacker", "attribute", "audit")  # what each row of an audit.csv is
BENCHMARK_DONE = "benchmark.md"  # written last by a benchmark script's --out
UNLEARNING_COLUMNS = ("HR@10", "NDCG@10", "HR@10_active", "HR@10_inactive", "ER@10", "MIA_AUC", "speedup_time",
                      "speedup", "speedup_steps", "client_epochs", "optimizer_steps", "unlearn_seconds")  # fmt: skip


def run_name(experiment: Path, folder: Path) -> tuple[str, str]:
    """A run folder's setting (its path in the experiment less the seed folder: SETTING[/MODEL]) and
    its seed folder's name ("" in an experiment without a seeds list: one run per setting)."""
    relative = folder.relative_to(experiment).as_posix()
    seed = SEED_FOLDER.search(relative)
    return SEED_FOLDER.sub("", relative), seed.group(0).lstrip("/") if seed else ""


@dataclass
class RunFolder:
    group: str  # the run's name without its seed folder: runs of one group differ only by seed
    seed: int
    folder: Path
    final: dict[str, Any]
    config: dict[str, Any]
    metrics: pd.DataFrame
    experiment: Path | None  # the experiment folder it belongs to, if any


def _read_run(folder: Path, group: str, experiment: Path | None) -> RunFolder:
    try:
        final = json.loads((folder / FINAL).read_text())
        config = tomllib.loads((folder / "config.toml").read_text())
        metrics = pd.read_csv(folder / "metrics.csv")
    except (OSError, ValueError, tomllib.TOMLDecodeError, pd.errors.ParserError) as error:
        raise FedUnlearnError(f"{folder} is damaged ({type(error).__name__}: {error}): rerun it") from None
    metrics_ok = isinstance(final, dict) and isinstance(final.get("metrics"), dict)
    values = [v for v in final["metrics"].values() if isinstance(v, (int, float))] if metrics_ok else []
    if not metrics_ok or not np.isfinite(values).all():
        raise FedUnlearnError(f"{folder / FINAL} holds no finite metrics (not fedunlearn's, or edited): rerun it")
    seed = int(config.get("run", {}).get("seed", 0))
    return RunFolder(group, seed, folder, final, config, metrics, experiment)


def _read_table(path: Path, keys: tuple[str, ...]) -> pd.DataFrame:
    """A run's CSV side file, each row naming what it is (`keys`), or a one-line error."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise FedUnlearnError(f"{path} is damaged ({type(error).__name__}): rerun the run") from None
    if not set(keys) <= set(table.columns) or table[list(keys)].isna().any().any():
        raise FedUnlearnError(f"{path} is damaged (a row without its {', '.join(keys)}): rerun the run")
    return table


def collect(paths: list[Path]) -> list[RunFolder]:
    """Every finished run under the given run or experiment folders, in the order given."""
    runs: list[RunFolder] = []
    for path in paths:
        if is_benchmark(path):
            continue
        if (path / FINAL).is_file():
            runs.append(_read_run(path, path.name, None))
        elif (path / "runs.csv").is_file():
            found = sorted(found.parent for found in path.rglob(FINAL))
            if not found:
                raise FedUnlearnError(f"{path} has runs.csv but no finished run folder: rerun the experiment")
            unfinished = sorted(run.relative_to(path).as_posix() for run in path.rglob("*.partial") if run.is_dir())
            if unfinished or (path / LOCK).exists():  # killed or running: runs.csv predates some of its runs
                which = f"unfinished runs ({', '.join(unfinished[:3])})" if unfinished else "a lock (running or killed)"
                raise FedUnlearnError(f"{path} holds {which}: its runs.csv does not describe its folders; finish it "
                                      "with experiment --resume")  # fmt: skip
            failed = failed_runs(path)
            if not failed.empty:
                names = ", ".join(f"{row.setting} (seed {row.seed})" for row in failed.head(3).itertuples())
                raise FedUnlearnError(f"{path}: {len(failed)} of its runs failed ({names}): a report would read as "
                                      "complete without them; finish it with experiment --resume")  # fmt: skip
            for folder in found:
                name, _ = run_name(path, folder)
                runs.append(_read_run(folder, f"{path.name}/{name}" if name else path.name, path))
        else:
            raise FedUnlearnError(
                f"{path} is neither a finished run folder (final.json), an experiment folder (runs.csv) nor a "
                f"benchmark folder ({BENCHMARK_DONE}): give the folder that `fedunlearn run`, `fedunlearn "
                "experiment` or a benchmark's --out wrote"
            )
    groups = [run.group for run in runs]
    if len(set(zip(groups, (run.seed for run in runs), strict=True))) < len(runs):
        raise FedUnlearnError("two of the given folders hold the same run (same name and seed): give each once")
    first: dict[str, RunFolder] = {}
    for run in runs:  # runs of one name are averaged as seeds of one setting: they must differ by seed only
        other = first.setdefault(run.group, run)
        changed = [f"{s}.{k}" for s, k in differing_keys(other.config, run.config) if (s, k) not in SEED_DEPENDENT]
        if changed:
            differ = ", ".join(changed[:3])
            raise FedUnlearnError(f"{other.folder} and {run.folder} share the name {run.group!r} but differ in "
                                  f"{differ}, not only the seed: give each its own folder name")  # fmt: skip
    return runs


SEED_DEPENDENT = {("run", "seed"), ("unlearn", "attackers"), ("unlearn", "target_item")}  # drawn from the seed's data


def failed_runs(experiment: Path) -> pd.DataFrame:
    """The rows of an experiment folder's runs.csv whose run failed (or, another setting's, was left
    unfinished by a resume with --only)."""
    listed = pd.read_csv(experiment / "runs.csv")
    return listed[listed["status"] != "ok"] if "status" in listed else listed[:0]


def is_benchmark(path: Path) -> bool:
    """A folder a benchmark script's --out wrote (benchmarks/engines.py): its tables as CSV files,
    and BENCHMARK_DONE last."""
    return (path / BENCHMARK_DONE).is_file()


def benchmark_sections(paths: list[Path]) -> list[tuple[str, str]]:
    """One section per table of every benchmark folder."""
    return [
        _section(f"{path.name}: {table.stem}", pd.read_csv(table).fillna(""), f"From {path / BENCHMARK_DONE}.")
        for path in paths
        if is_benchmark(path)
        for table in sorted(path.glob("*.csv"))
    ]


def quality_table(runs: list[RunFolder]) -> pd.DataFrame:
    """Per group: the final metrics of every seed, mean ± std; a run with a post-training defence is
    scored before it (its `defence` cell says so; the privacy table has NDCG@10 after it, or
    without an audit `_after_unaudited_defence`)."""
    rows = []
    for run in runs:
        metrics = run.final["metrics"]
        mode = run.final.get("mode", "-")
        method = run.config.get("defence", {}).get("method", "none")
        rows.append(
            {"run": run.group, "seed": run.seed, "dataset": run.config.get("data", {}).get("dataset", "-"),
             "defence": f"before {method}" if method != "none" else "-",
             "model": run.config["model"]["name"] if mode != "popularity" else "-",
             "mode": mode, "engine": run.final.get("engine", "-") if mode == "federated" else "-",
             "round": metrics.get("round"),
             "clients": run.final.get("clients"), "HR@10": metrics.get("HR@10"), "NDCG@10": metrics.get("NDCG@10"),
             "popularity_HR@10": run.final.get("popularity_HR@10"), "seconds": run.final.get("seconds")}  # fmt: skip
            | _after_unaudited_defence(run)
        )
    return summarize(pd.DataFrame(rows))


def _after_unaudited_defence(run: RunFolder) -> dict[str, float]:
    """A Flower run that defended without the audit has no privacy table: its clients' NDCG@10
    after the defence (final.json's `defence`) goes beside the quality row instead."""
    defence = run.final.get("defence")
    return {"NDCG@10_after_defence": defence["NDCG@10"]} if isinstance(defence, dict) else {}


def _seconds_per_round(run: RunFolder) -> float:
    """Seconds per round from metrics.csv's `seconds` (the time since the loop started, at each
    evaluated round): between the first and the last evaluated round, so the first round's
    start-up is left out when there are two; over every round when there is one."""
    if "seconds" not in run.metrics or run.metrics.empty:
        return float("nan")
    rounds, elapsed = run.metrics["round"].to_numpy(dtype=float), run.metrics["seconds"].to_numpy(dtype=float)
    if len(rounds) == 1:
        return float(elapsed[0] / rounds[0])
    return float((elapsed[-1] - elapsed[0]) / (rounds[-1] - rounds[0]))


def time_table(runs: list[RunFolder]) -> pd.DataFrame:
    rows = [
        {"run": run.group, "seed": run.seed, "engine": run.final.get("engine", "-"),
         "clients": run.final.get("clients"), "seconds_per_round": _seconds_per_round(run),
         "seconds": run.final.get("seconds")}  # fmt: skip
        for run in runs
        if run.final.get("mode") == "federated"
    ]
    return summarize(pd.DataFrame(rows)) if rows else pd.DataFrame()


def unlearning_rows(runs: list[RunFolder]) -> pd.DataFrame:
    """One row per method, event and seed: a run's unlearning.csv (`unlearn.compare`), or an
    experiment's runs.csv rows (one run per method, judged against Retrain's run)."""
    frames, compared = [], set()  # compared: (experiment, setting) whose runs hold their own comparison
    for run in runs:
        if (run.folder / "unlearning.csv").is_file():
            frames.append(_read_table(run.folder / "unlearning.csv", ("method", "event")).assign(run=run.group))
            if run.experiment is not None:
                compared.add((run.experiment, run.folder.relative_to(run.experiment).parts[0]))
    for experiment in dict.fromkeys(run.experiment for run in runs if run.experiment is not None):
        table = pd.read_csv(experiment / "runs.csv")
        if {"method", "event"} <= set(table.columns):
            table = table[table["status"] == "ok"] if "status" in table.columns else table
            table = table[table["method"].notna() & table["event"].notna()]  # not a no-drop or an audit row
            table = table[[(experiment, setting) not in compared for setting in table["setting"]]]
            frames.append(table.assign(run=experiment.name))
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame()
    rows = _speedups_now(pd.concat(frames, ignore_index=True))
    keep = ["run", "setting", "model", "method", "event", "seed", "retrain_key",
            *(c for c in UNLEARNING_COLUMNS if c in rows.columns)]  # fmt: skip
    return rows[[c for c in keep if c in rows.columns]]


def _speedups_now(rows: pd.DataFrame) -> pd.DataFrame:
    """The speedups taken again from each row's own costs by today's rule (fl.comparison), so a
    folder written under an older rule (a wall ratio over a no-op's milliseconds) reads as today's."""
    needed = {"run", "model", "seed", "method", "client_epochs", "optimizer_steps", "unlearn_seconds"}
    if not needed <= set(rows.columns):
        return rows
    records = []
    for _, group in rows.groupby("run", sort=False):
        block = group.to_dict("records")
        for record in block:
            record.update(speedup=np.nan, speedup_steps=np.nan, speedup_time=np.nan)
        compare_with_retrain(block, [None] * len(block))
        records += block
    columns = dict.fromkeys([*rows.columns, "speedup", "speedup_steps", "speedup_time"])
    return pd.DataFrame(records, columns=list(columns))


def audit_rows(runs: list[RunFolder]) -> pd.DataFrame:
    audited = [run for run in runs if (run.folder / "audit.csv").is_file()]
    frames = [  # an empty audit.csv: no attribute had enough clients per class to attack
        _read_table(run.folder / "audit.csv", AUDIT_KEYS).assign(run=run.group, seed=run.seed)
        for run in audited
        if (run.folder / "audit.csv").stat().st_size > 1
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def privacy_table(audits: pd.DataFrame) -> pd.DataFrame:
    """The global audit on the embeddings per run, defence, attribute and attacker (mean ± std over
    seeds), with the local audit's share of clients at risk beside it."""
    embedding = audits[audits["view"] == "embedding"]
    keys = ["run", "defence", "attribute", "attacker"]
    columns = audit_columns(embedding)
    table = summarize(embedding[embedding["audit"] == "global"][[*keys, "seed", *columns]])
    local = embedding[embedding["audit"] == "local"]
    if not local.empty:
        at_risk = summarize(local[[*keys, "seed", "at_risk"]].rename(columns={"at_risk": "local_at_risk"}))
        table = table.merge(at_risk.drop(columns=["seeds"], errors="ignore"), on=keys, how="left")
    return table


def _embeddings(run: RunFolder) -> tuple[np.ndarray, np.ndarray, pd.DataFrame] | None:
    saved = run.folder / EMBEDDINGS_FILE
    if not saved.is_file():
        return None
    arrays = read_central_view(saved)
    labels = saved_attributes(arrays)
    if "after" not in arrays or labels.empty:  # no defence ran, or written before the labels were kept
        return None
    return arrays["before"], arrays["after"], labels


def _plots(runs: list[RunFolder], unlearning: pd.DataFrame, audits: pd.DataFrame, times: pd.DataFrame,
           out: Path) -> dict[str, str]:  # fmt: skip
    """Every plot the folders have data for: file name -> what it shows."""
    made: dict[str, str] = {}
    groups = dict.fromkeys(run.group for run in runs)
    curves = {group: pd.concat([run.metrics for run in runs if run.group == group]) for group in groups}
    events = {run.group: [event["round"] for event in run.final.get("events", [])] for run in runs}
    plot_rounds(curves, events, out / "rounds.png")
    made["rounds.png"] = "HR@10 and NDCG@10 per round, drop events dotted"
    if not unlearning.empty:
        plot_unlearning(unlearning, out / "unlearning_tradeoff.png")
        made["unlearning_tradeoff.png"] = "retained HR@10 minus Retrain's against the speedup over Retrain, per method"
        plot_forgetting(unlearning, out / "unlearning_forgetting.png")
        made["unlearning_forgetting.png"] = "MIA AUC (and ER@10 under attack) per method"
    if not audits.empty:
        audits = audits.assign(run=short_names(audits["run"]))
        several = audits["run"].nunique() > 1  # the defences of each run told apart
        labelled = audits.assign(defence=audits["run"] + ": " + audits["defence"]) if several else audits
        plot_tradeoff(audits, out / "privacy_tradeoff.png")
        made["privacy_tradeoff.png"] = "attack balanced accuracy against NDCG@10 per defence, chance dashed"
        plot_audit_views(labelled, out / "audit_views.png")
        made["audit_views.png"] = "global audit against the clients' local view, per attribute"
    for run in runs:
        embedded = _embeddings(run)
        if embedded is not None:
            plot_embeddings(*embedded, out / "embeddings.png")
            made["embeddings.png"] = (
                f"user embeddings by class before and after the defence ({run.group}, seed {run.seed})"
            )
            break
    if not times.empty:
        plot_time(times, out / "time.png")
        made["time.png"] = "seconds per round per run (drop events included)"
    return made


def _benchmark_plots(paths: list[Path], out: Path) -> dict[str, str]:
    """The scalability plot, from the first benchmark folder with either of benchmarks/engines.py's tables."""
    for path in filter(is_benchmark, paths):
        tables = [path / "engines.csv", path / "scaling.csv"]
        if any(table.is_file() for table in tables):
            engines, scaling = (pd.read_csv(table) if table.is_file() else pd.DataFrame() for table in tables)
            plot_scalability(engines, scaling, out / "scalability.png")
            return {"scalability.png": f"seconds per round and peak memory per engine and federation size ({path})"}
    return {}


def short_names(names: pd.Series) -> pd.Series:
    """Run names less the folder path they all share ("attribute/trained/mf" and ".../ncf" read
    "mf" and "ncf"), for labels that fit a plot."""
    parts = [str(name).split("/") for name in names.unique()]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return names.map(lambda name: "/".join(str(name).split("/")[common:]))


def _section(title: str, table: pd.DataFrame, note: str = "") -> tuple[str, str]:
    """(markdown, html) of one titled table."""
    cells, _ = readable_cells(table)
    markdown = f"## {title}\n\n{note}\n\n{readable(table)}\n" if note else f"## {title}\n\n{readable(table)}\n"
    page = f"<h2>{html.escape(title)}</h2>\n" + (f"<p>{html.escape(note)}</p>\n" if note else "")
    return markdown, page + cells.to_html(index=False, escape=True, border=0, classes="table") + "\n"


def write_report(paths: list[Path], out: Path) -> dict[str, str]:
    """report.md, report.html and the plots in `out` (built beside it and renamed when complete);
    returns the plots made."""
    if out.exists():
        raise FedUnlearnError(f"{out} exists: choose another --out (a report is never written over)")
    runs = collect(paths)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # maybe an interrupted run's, or a report being written now: never ours to delete
        raise FedUnlearnError(f"{partial} exists: remove it if it is an unfinished report, or choose another --out")
    partial.mkdir(parents=True)
    try:
        unlearning, audits, times = unlearning_rows(runs), audit_rows(runs), time_table(runs)
        sections = [_section("Recommendation quality", quality_table(runs),
                             "Mean ± std (sample std, ddof 1) over seeds where a run has several; `round`: the "
                             "round scored (the last, or with eval.select = best_valid the best validation "
                             "HR@10's; centralized: the epoch). A run with a "
                             "post-training defence is scored before it (defence column): its NDCG@10 after "
                             "the defence is in the privacy table (a Flower run without the audit: "
                             "NDCG@10_after_defence).")] if runs else []  # fmt: skip
        if not unlearning.empty:
            unlearned = summarize(unlearning)
            sections.append(_section("Unlearning, judged against Retrain", unlearned,
                                     "Retained users right after the event; speedup is in client-epochs, '-' "
                                     "where a method trained nothing; speedup_time in wall time, '-' where its "
                                     "event took under 0.1 s (no ratio over bookkeeping)."))  # fmt: skip
        if not audits.empty:
            sections.append(_section("Attribute privacy (global audit on the embeddings)", privacy_table(audits),
                                     "relabelled: a below-chance attacker flipped, the information left; "
                                     "null_95: what the relabelled figure reaches for answers that carry nothing "
                                     "(95th percentile over shuffled labels): above it, the attribute is still "
                                     "read."))  # fmt: skip
        if not times.empty:
            sections.append(_section("Time", times, "Seconds per round (training, the evaluation every "
                                     "eval.every rounds, and any drop event with its unlearning and unlearn.compare "
                                     "trials in those rounds), between the first and the last evaluated round."))
        sections += benchmark_sections(paths)
        plots = _plots(runs, unlearning, audits, times, partial) if runs else {}
        plots |= _benchmark_plots(paths, partial)
        sources = ", ".join(str(path) for path in paths)
        benchmarks = sum(map(is_benchmark, paths))
        counted = f"{len(runs)} runs" + (f", {benchmarks} benchmark folders" if benchmarks else "")
        markdown = [f"# fedunlearn report\n\nFolders: {sources} ({counted})\n"]
        markdown += [md for md, _ in sections]
        listed = "\n".join(f"- [{name}]({name}): {what}" for name, what in plots.items())
        markdown.append(f"## Plots\n\n{listed}\n")
        (partial / "report.md").write_text("\n".join(markdown))
        images = "".join(
            f"<figure><img alt='{html.escape(what)}' src='data:image/png;base64,"
            f"{base64.b64encode((partial / name).read_bytes()).decode()}'>"
            f"<figcaption>{html.escape(what)}</figcaption></figure>\n"
            for name, what in plots.items()
        )
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>fedunlearn report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}</style></head>"
            f"<body><h1>fedunlearn report</h1><p>Folders: {html.escape(sources)} ({counted})</p>\n"
            + "".join(page for _, page in sections)
            + f"<h2>Plots</h2>\n{images}</body></html>\n"
        )
        (partial / "report.html").write_text(page)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return plots
