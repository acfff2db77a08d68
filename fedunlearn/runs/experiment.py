"""`fedunlearn experiment FILE.toml`: a table's worth of settings, one row each.

File format: an optional `seeds = [0, 1, 2]` (every setting once per seed), an optional
`models = ["mf", "ncf"]` (every setting once per model), an optional `[base]` table of
`section.key = value` settings shared by every row, then one `[[setting]]` per row with a `name`
and its own `set` table, e.g.

    [base]
    "data.dataset" = "ml-100k"

    [[setting]]
    name = "federated-mf"
    set = { "model.name" = "mf", "run.mode" = "federated" }
"""

from __future__ import annotations

import itertools
import json
import re
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedunlearn.config import Config, apply_mapping, differing_keys, load_overrides, read_toml, validate
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.comparison import compare_with_retrain, initial_key, reference_key
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.rounds import COMPARED
from fedunlearn.models.base import Arrays
from fedunlearn.runs.results import FINAL, LOCK, lock_folder, partial_of, staged, unlock, write_config, write_run
from fedunlearn.runs.runner import RunOutcome, execute, preflight
from fedunlearn.runs.tables import readable

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_settings(
    path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
    seeds: list[int] | None = None, seeds_from: str = "--seeds",
) -> list[tuple[str, Config]]:  # fmt: skip
    """One (name, config) per setting, model and seed: `models = [...]` at the top runs every
    setting once per model (folders `<name>/<model>`), `seeds = [...]` once per seed (`.../seed<k>`).
    `only`: just the settings of these names; `seeds`: these instead of the file's (`seeds_from`
    says where they were given)."""
    spec = read_toml(path)
    unknown = set(spec) - {"base", "setting", "title", "seeds", "models"}
    if unknown:
        raise FedUnlearnError(f"{path}: unknown tables {sorted(unknown)}; use seeds, models, [base] and [[setting]]")
    settings = spec.get("setting", [])
    if not settings:
        raise FedUnlearnError(f"{path} has no [[setting]] rows: add at least one")
    if not isinstance(settings, list) or not all(isinstance(row, dict) for row in settings):
        raise FedUnlearnError(f"{path}: setting must be [[setting]] tables, each with a name and a set table")
    names_given = {row.get("name") for row in settings if isinstance(row.get("name"), str)}  # others: refused below
    unknown_names = sorted(set(only or []) - names_given)
    if unknown_names:
        known = ", ".join(str(row.get("name")) for row in settings)
        raise FedUnlearnError(f"{path} has no setting named {unknown_names}: choose among {known}")
    settings = [row for row in settings if not only or row.get("name") in only]
    if not seeds:
        seeds, seeds_from = _list_of(spec, "seeds", int, path, "seeds = [0, 1, 2]"), f"{path}'s seeds"
    models = _list_of(spec, "models", str, path, 'models = ["mf", "ncf"]')
    listed = {"run.seed": (seeds, seeds_from), "model.name": (models, f"{path}'s models")}
    _refuse_replaced(path, spec, overrides, listed)
    for label, values in ((seeds_from, seeds), (f"{path}'s models", models)):
        repeated = sorted({str(v) for v in values or [] if (values or []).count(v) > 1})
        if repeated:
            raise FedUnlearnError(f"{label} lists {', '.join(repeated)} more than once: list each once")
    out, names = [], set()
    for row in settings:
        name = row.get("name")
        stray = sorted(set(row) - {"name", "set"})
        if stray:
            raise FedUnlearnError(f"{path}: setting {name!r} has {stray}; a [[setting]] holds a name and a set only")
        if name and (not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name):
            raise FedUnlearnError(
                f"{path}: setting name {name!r} is used as a folder name: use letters, digits, '-', '_' and '.' only"
            )
        if not name or name in names:
            raise FedUnlearnError(f"{path}: every [[setting]] needs a unique name; got {name!r}")
        names.add(name)
        for model in models or [None]:
            for seed in seeds or [None]:
                config = Config()
                apply_mapping(config, spec.get("base", {}), f"{path}: [base]")
                apply_mapping(config, row.get("set", {}), f"{path}: the set of setting {name!r}")
                load_overrides(config, overrides or [])
                if model is not None:
                    config.model.name = model
                if seed is not None:
                    config.run.seed = seed
                folder = "/".join(part for part in (name, model, None if seed is None else f"seed{seed}") if part)
                out.append((folder, validate(config)))
    return out


def _refuse_replaced(
    path: str | Path, spec: dict[str, Any], overrides: list[str] | None, listed: dict[str, tuple[Any, str]]
) -> None:
    """A key each run takes from a list (its seed, its model) set anywhere else was replaced
    without a word (`--set run.seed=11` on a file listing seeds ran the listed seeds): refused."""
    places = [("an override (--set, or a suite's set)", {item.split("=", 1)[0].strip() for item in overrides or []})]
    places.append((f"{path}'s [base]", _keys(spec.get("base", {}))))
    places += [(f"{path}'s setting {row.get('name')!r}", _keys(row.get("set", {})))
               for row in spec.get("setting", []) if isinstance(row, dict)]  # fmt: skip
    for key, (values, source) in listed.items():
        where = next((where for where, keys in places if key in keys), None)
        if values and where:
            raise FedUnlearnError(f"{key} is set in {where}, but each run takes its own from {source} ({values}), "
                                  "which would replace it: list the values there instead")  # fmt: skip


def _keys(mapping: Any) -> set[str]:
    """The dotted keys a [base] or set table sets (nested or dotted, as apply_mapping reads it)."""
    if not isinstance(mapping, dict):
        return set()  # refused with its own message when applied
    return {f"{name}.{key}" for name, value in mapping.items() if isinstance(value, dict) for key in value} | {
        name for name, value in mapping.items() if not isinstance(value, dict)
    }


def _list_of(spec: dict[str, Any], key: str, kind: type, path: str | Path, example: str) -> list[Any] | None:
    values = spec.get(key)
    well_typed = isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
    if values is not None and not well_typed:
        raise FedUnlearnError(f"{path}: {key} must be a list of {kind.__name__} values, e.g. {example}")
    return values


def _rows(name: str, config: Config, outcome: RunOutcome) -> list[dict[str, Any]]:
    """The run's row: its final metrics, or with drop events one row per event (the retained users
    right after it), each judged later against the Retrain run's row of the same event. The engine
    is the one that ran (`auto` resolved)."""
    result, info = outcome.result, outcome.info
    row: dict[str, Any] = {
        "setting": name.split("/")[0],
        "seed": config.run.seed,
        "model": config.model.name if config.run.mode != "popularity" else "-",  # popularity has no model
        "mode": config.run.mode,
        "engine": outcome.config.run.engine if config.run.mode == "federated" else "-",
        "round": result.final.get("round", 0),
    }
    metrics = {k: v for k, v in result.final.items() if "@" in k}
    if not result.events:
        return [row | metrics | {"seconds": info["seconds"]}]
    return [
        row
        | {"event": event["round"], "method": config.unlearn.method}
        | {k: v for k, v in event["after"].items() if k in COMPARED}
        | {"final_HR@10": metrics["HR@10"], "final_NDCG@10": metrics["NDCG@10"]}
        | {"MIA_AUC": event["MIA_AUC"], "unlearn_seconds": event["seconds"], "client_epochs": event["client_epochs"]}
        | {"optimizer_steps": event["optimizer_steps"]}
        | {"history_bytes": event["history_bytes"]["file"], "seconds": info["seconds"]}
        | {"retrain_key": reference_key(outcome.config)}  # its engine resolved
        | {"initial": event.get("initial", initial_key(config))}  # events before 2026-12-07 grew from the run's
        for event in result.events
    ]


def _privacy_rows(name: str, config: Config, outcome: RunOutcome) -> list[dict[str, Any]]:
    """One row per defence x view x attacker x attribute x audit of the run's attribute audit; the
    audit's `seconds` (the defence's) as `defence_seconds`, beside the run's `seconds` as every row has."""
    base = {"run": name.split("/")[0], "seed": config.run.seed, "model": config.model.name}
    base |= {"engine": outcome.config.run.engine}
    rows = outcome.result.privacy.table.rename(columns={"seconds": "defence_seconds"}).to_dict("records")
    return [base | {"setting": row.pop("defence")} | row | {"seconds": outcome.info["seconds"]} for row in rows]


ROWS_FILE = "experiment_rows.json"  # a finished run's table rows, for `--resume`
ROWS_FORMAT = 4  # 2026-12-07: retrain_key names the engine, history_bytes the history file's bytes; an
# audited run with a drop keeps its events' rows; (afternoon) retrain_key names who applies an upload defence
REQUESTED_FILE = "experiment_config.json"  # the settings the experiment asked of a run, for `--resume`
DATA_KEY = "data_fingerprint"  # beside them: the clients and partitions it trained on (Federation.fingerprint)


def _requested(config: Config) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def _data_fingerprint(config: Config) -> str:
    return cached_federation(config.data, config.run.seed).fingerprint


def _check_resumable(folder: Path, settings: list[tuple[str, Config]]) -> None:
    """A run resumed or read back must have been asked for with the same settings: a finished one
    would sit in the table beside runs of other settings, an interrupted one would go on from a
    checkpoint trained with the old ones."""
    for name, config in settings:
        for run in (folder / name, partial_of(folder / name)):
            saved = run / REQUESTED_FILE
            if not saved.is_file():
                continue
            before, now = json.loads(saved.read_text()), _requested(config)
            data = before.pop(DATA_KEY, None)
            changed = [f"{s}.{k}: {before.get(s, {}).get(k)!r} -> {now.get(s, {}).get(k)!r}"
                       for s, k in differing_keys(before, now)]  # fmt: skip
            if changed:
                raise FedUnlearnError(f"{run} ran with other settings ({'; '.join(changed[:3])}): resume with the "
                                      "same experiment file, --set and --only, or choose another --out")  # fmt: skip
            if run == folder / name:  # an interrupted run's checkpoint checks its own data when it resumes
                _check_same_data(run, config, data)
        if (folder / name / FINAL).is_file():
            _saved_rows(folder / name)  # a finished run's rows must be of this version's format


def _refuse_runs_not_asked(folder: Path, asked: set[str]) -> None:
    """A resumed experiment that would neither run nor read a run its folder holds (begun with
    --seeds 11,12, resumed without: seeds 0-2 ran into it, the tables left 11 and 12 out while their
    folders stayed for `report` to find): refused."""
    for saved in sorted(folder.rglob(REQUESTED_FILE)):
        run = saved.parent.relative_to(folder).as_posix().removesuffix(".partial")
        if run not in asked:
            raise FedUnlearnError(f"{folder / run} is a run of this folder that this call would not run or read "
                                  "(other --seeds, or an edited seeds, models or setting list): resume with what it "
                                  "began with, or choose another --out")  # fmt: skip


def _check_same_data(run: Path, config: Config, recorded: str | None) -> None:
    """A finished run is read back beside runs trained now: on other data (the same file name, other
    contents) the table would mislead. Data that cannot be read is not checked: no run can then
    train on it, and the preflight refuses any that would."""
    if recorded is None:
        raise FedUnlearnError(f"{run} was finished before fedunlearn recorded a run's data (2026-12-07): "
                              "remove it to run it again, or choose another --out")  # fmt: skip
    try:
        now = _data_fingerprint(config)
    except FedUnlearnError:
        return
    if recorded != now:
        raise FedUnlearnError(f"{run} ran on other data (its clients or their partitions changed since): "
                              "restore the data it ran on, or choose another --out")  # fmt: skip


def _saved_rows(run: Path) -> list[dict[str, Any]]:
    """A finished run's table rows, if this version wrote them."""
    stored = json.loads((run / ROWS_FILE).read_text())
    if not isinstance(stored, dict) or stored.get("format") != ROWS_FORMAT:  # a list: before the format
        raise FedUnlearnError(f"{run} was finished by an older fedunlearn, whose table rows are not comparable with "
                              f"this one's (Retrain keys, history bytes): remove {run} to run it again, or choose "
                              "another --out")  # fmt: skip
    return stored["rows"]


def _run_one(name: str, config: Config, folder: Path, show_progress: bool) -> tuple[list[dict[str, Any]], Arrays]:
    """One run into its own staged folder (resumed if a killed one left it), or its saved rows when
    it finished before; a bad input or divergence becomes a `failed` row."""
    run = folder / name
    if (run / FINAL).is_file():
        unlearned = run / "unlearned.npz"
        saved = dict(np.load(unlearned, allow_pickle=False)) if unlearned.is_file() else {}
        return _saved_rows(run), saved
    try:
        with staged(run, resume=partial_of(run).is_dir()) as staging:
            write_config(staging.folder, config)
            requested = _requested(config) | {DATA_KEY: _data_fingerprint(config)}
            (staging.folder / REQUESTED_FILE).write_text(json.dumps(requested, sort_keys=True) + "\n")
            outcome = execute(config, staging.folder, show_progress)
            staging.final = write_run(staging.folder, outcome.config, outcome.result, outcome.info)
            audited, events = outcome.result.privacy is not None, bool(outcome.result.events)
            rows = _privacy_rows(name, config, outcome) if audited else []  # an audit's rows, and its events' rows
            rows += _rows(name, config, outcome) if events or not audited else []
            rows = [row | {"status": "ok"} for row in rows]
            (staging.folder / ROWS_FILE).write_text(json.dumps({"format": ROWS_FORMAT, "rows": rows}) + "\n")
    except FedUnlearnError as error:
        return [{"setting": name.split("/")[0], "seed": config.run.seed, "model": config.model.name,
                 "status": "failed", "error": str(error)}], {}  # fmt: skip
    return rows, outcome.result.unlearned


def run_experiment(
    path: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    jobs: int = 1,
    only: list[str] | None = None,
    resume: bool = False,
    seeds: list[int] | None = None,
    seeds_from: str = "--seeds",
) -> pd.DataFrame:
    """Run every setting (and model and seed), `jobs` at a time in separate processes, then write
    runs.csv (one row per run, `status` ok or failed with the one-line error) and table.csv /
    table.md (one row per setting and model over the runs that finished: means, and `<column>_std`
    when there are several seeds). Each run is staged on its own; `resume` continues an
    experiment folder: finished runs are read back, interrupted ones resumed, failed ones retried.
    Any failed run makes the whole call an error once the tables are written."""
    if jobs < 1:
        raise FedUnlearnError(f"--jobs is {jobs} but must be at least 1")
    settings = load_settings(path, overrides, only, seeds, seeds_from)
    every = load_settings(path, overrides, None, seeds, seeds_from) if only else settings  # --only's others too
    folder = Path(out)
    started = [folder / name for name, _ in every]
    ours = folder.is_dir() and (
        (folder / "runs.csv").is_file()
        or any(run.is_dir() or partial_of(run).is_dir() for run in started)
        or {path.name for path in folder.iterdir()} <= {LOCK}  # stopped before its first run
    )
    if resume and not ours:
        raise FedUnlearnError(f"{folder} holds no run of this experiment to resume: run without --resume first")
    if resume:
        _refuse_runs_not_asked(folder, {run.relative_to(folder).as_posix() for run in started})
    if not resume and folder.exists():
        hint = "continue it with --resume" if ours else "it is not this experiment's folder"
        raise FedUnlearnError(f"results folder {folder} exists ({hint}): choose another --out")
    carried: list[dict[str, Any]] = []
    if resume and only:  # the other settings' finished runs stay in runs.csv and the tables, their failures too
        chosen = {name for name, _ in settings}
        settings = [(name, config) for name, config in every if name in chosen or (folder / name / FINAL).is_file()]
        kept = {name for name, _ in settings}
        carried = _earlier_failures(folder, [(name, config) for name, config in every if name not in kept])
        carried += [{"setting": name.split("/")[0], "seed": config.run.seed, "model": config.model.name,
                     "status": "unfinished", "error": f"{name} was interrupted: finish it with --resume (without "
                     "--only, or with its setting's)"}  # an interrupted run the tables would leave out unsaid
                    for name, config in every if name not in kept and partial_of(folder / name).is_dir()]  # fmt: skip
    if resume:
        _check_resumable(folder, settings)
    check_before_running([(name, config) for name, config in settings if not (folder / name / FINAL).is_file()])
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder)
    try:
        results = _run_all(settings, folder, show_progress, jobs)
        ok = [(run_rows, params) for run_rows, params in results if run_rows[0]["status"] == "ok"]
        rows = [row for run_rows, _ in ok for row in run_rows]
        # the unlearned model is kept for a run's last event: the distances to Retrain are taken there
        last = [params if i == len(run_rows) - 1 else None for run_rows, params in ok for i in range(len(run_rows))]
        compare_with_retrain(rows, last)
        failed = [run_rows[0] for run_rows, _ in results if run_rows[0]["status"] == "failed"] + carried
        runs = pd.DataFrame(rows + failed)
        runs.to_csv(folder / "runs.csv", index=False)
        table = summarize(pd.DataFrame(rows).drop(columns="status")) if rows else pd.DataFrame()
        table.to_csv(folder / "table.csv", index=False)
        missing = "".join(f"\n**{row['status'].capitalize()}, not in this table**: {row['setting']} (seed "
                          f"{row['seed']}): {row['error']}\n" for row in failed)  # fmt: skip
        (folder / "table.md").write_text(readable(table) + "\n" + missing)
        if "balanced_accuracy" in table.columns:
            from fedunlearn.runs.plots import plot_tradeoff

            plot_tradeoff(table[table["audit"].notna()], folder / "tradeoff.png", label="setting")
    finally:
        unlock(folder, lock)
    if failed:
        first = f"{failed[0]['setting']} (seed {failed[0]['seed']}): {failed[0]['error']}"
        how = "failed" if all(row["status"] == "failed" for row in failed) else "failed or are unfinished"
        raise FedUnlearnError(f"{len(failed)} of {len(results) + len(carried)} runs {how} (see {folder}/runs.csv); "
                              f"first: {first}")  # fmt: skip
    return table


def check_before_running(settings: list[tuple[str, Config]]) -> None:
    """Every run's bad input said before the first run trains (runner.preflight): a drop event past
    the end or a missing data file in the last setting stopped an experiment only after the others."""
    for name, config in settings:
        try:
            preflight(config)
        except FedUnlearnError as error:
            raise FedUnlearnError(f"{name}: {error}") from None


def _earlier_failures(folder: Path, runs: list[tuple[str, Config]]) -> list[dict[str, Any]]:
    """The failed rows an earlier call wrote in runs.csv for these runs, which this call does not run
    (`--resume --only` other settings): they stay failed, so the experiment still reads unfinished."""
    path = folder / "runs.csv"
    earlier = pd.read_csv(path, dtype={"setting": str}) if path.is_file() else pd.DataFrame()
    if "status" not in earlier.columns:
        return []
    wanted = {(name.split("/")[0], config.run.seed, config.model.name) for name, config in runs}
    return [
        {key: row[key] for key in ("setting", "seed", "model", "status", "error")}
        for row in earlier[earlier["status"] == "failed"].to_dict("records")
        if (row["setting"], int(row["seed"]), row["model"]) in wanted
    ]


def _run_all(
    settings: list[tuple[str, Config]], folder: Path, show_progress: bool, jobs: int
) -> list[tuple[list[dict[str, Any]], Arrays]]:
    results: list[tuple[list[dict[str, Any]], Arrays] | None] = [None] * len(settings)
    if jobs == 1:
        for index, (name, config) in enumerate(settings):
            print(f"[{index + 1}/{len(settings)}] {name}", flush=True)
            results[index] = _run_one(name, config, folder, show_progress)
    else:
        # spawn: a forked child would inherit torch's thread pools and any Ray state
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as executor:
            # at most `jobs` runs handed out at a time: on Ctrl-C the runs in flight get the signal
            # too, and nothing queued behind them starts (all submitted at once, the pool had passed
            # one more to a worker, which then trained it to the end after the interrupt)
            waiting, running = iter(enumerate(settings)), {}

            def hand_out() -> None:
                for index, (name, config) in itertools.islice(waiting, 1):
                    running[executor.submit(_run_one, name, config, folder, False)] = index

            for _ in range(jobs):
                hand_out()
            done = 0
            while running:
                for future in wait(running, return_when=FIRST_COMPLETED).done:
                    index = running.pop(future)
                    results[index] = future.result()
                    done += 1
                    print(f"[{done}/{len(settings)}] {settings[index][0]} done", flush=True)
                    hand_out()
    return [result for result in results if result is not None]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows that differ only by seed as one: the mean, and `<column>_std` with a `seeds` count when
    a group has several. A figure some of a group's seeds lack (a speedup under the measurable
    floor, a seed without its Retrain) is left empty rather than averaged over the others beside a
    `seeds` count that says all of them."""
    # an audited run's `setting` is its defence and `run` the experiment's setting: both tell rows apart
    grouping = ("run", "setting", "dataset", "defence", "model", "mode", "engine", "method", "event", "audit", "view")
    grouping += ("attacker", "attribute")
    keys = [c for c in grouping if c in runs.columns]
    numeric = [c for c in runs.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(runs[c])]
    grouped = runs.groupby(keys, sort=False, dropna=False)[numeric]
    complete = (grouped.count() == grouped.size().to_numpy()[:, None]).reset_index(drop=True)
    table = grouped.mean().reset_index()
    table[numeric] = table[numeric].where(complete)
    if runs.groupby(keys, sort=False, dropna=False).size().max() > 1:
        std = grouped.std().reset_index(drop=True).where(complete).add_suffix("_std")
        table = pd.concat([table, std], axis=1)
        table.insert(len(keys), "seeds", grouped.size().to_numpy())
    return table
