"""`fedunlearn experiment FILE.toml`: a table's worth of settings, one row each.

File format: an optional `seeds = [0, 1, 2]` (every setting once per seed), an optional `[base]`
table of `section.key = value` settings shared by every row, then one `[[setting]]` per row with
a `name` and its own `set` table, e.g.

    [base]
    "data.dataset" = "ml-100k"

    [[setting]]
    name = "federated-mf"
    set = { "model.name" = "mf", "run.mode" = "federated" }
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fedunlearn.audit import compare_with_retrain
from fedunlearn.config import Config, apply_mapping, load_overrides, read_toml, validate
from fedunlearn.errors import FedUnlearnError
from fedunlearn.models import Arrays
from fedunlearn.results import staged, write_run
from fedunlearn.runner import RunOutcome, execute


def load_settings(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str, Config]]:
    """One (name, config) per setting and seed; `seeds = [0, 1, 2]` at the top runs every setting
    once per seed (folders `<name>/seed<k>`), otherwise each setting runs once."""
    spec = read_toml(path)
    unknown = set(spec) - {"base", "setting", "title", "seeds"}
    if unknown:
        raise FedUnlearnError(f"{path}: unknown tables {sorted(unknown)}; use seeds, [base] and [[setting]]")
    settings = spec.get("setting", [])
    if not settings:
        raise FedUnlearnError(f"{path} has no [[setting]] rows: add at least one")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(v, int) for v in seeds)):
        raise FedUnlearnError(f"{path}: seeds must be a list of whole numbers, e.g. seeds = [0, 1, 2]")
    out, names = [], set()
    for row in settings:
        name = row.get("name")
        if not name or name in names:
            raise FedUnlearnError(f"{path}: every [[setting]] needs a unique name; got {name!r}")
        names.add(name)
        for seed in seeds or [None]:
            config = Config()
            apply_mapping(config, spec.get("base", {}))
            apply_mapping(config, row.get("set", {}))
            load_overrides(config, overrides or [])
            if seed is not None:
                config.run.seed = seed
            out.append((name if seed is None else f"{name}/seed{seed}", validate(config)))
    return out


def _row(name: str, config: Config, outcome: RunOutcome) -> dict[str, Any]:
    result, info = outcome.result, outcome.info
    row: dict[str, Any] = {
        "setting": name.split("/")[0],
        "seed": config.run.seed,
        "model": config.model.name,
        "mode": config.run.mode,
        "engine": config.run.engine if config.run.mode == "federated" else "-",
        "round": result.final.get("round", 0),
    }
    metrics = {k: v for k, v in result.final.items() if "@" in k}
    if not result.events:
        return row | metrics | {"seconds": info["seconds"]}
    event = result.events[-1]
    return (
        row
        | {"method": config.unlearn.method}
        | {k: v for k, v in event["after"].items() if k in ("HR@10", "NDCG@10", "ER@10")}
        | {"final_HR@10": metrics["HR@10"], "final_NDCG@10": metrics["NDCG@10"]}
        | {"MIA_AUC": event["MIA_AUC"], "unlearn_seconds": event["seconds"], "client_epochs": event["client_epochs"]}
        | {"history_bytes": info["history_bytes"]["total"], "seconds": info["seconds"]}
    )


def run_experiment(
    path: str | Path, out: str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> pd.DataFrame:
    """Run every setting (and seed), then write runs.csv (one row per run) and table.csv / table.md
    (one row per setting: means, and `<column>_std` when there are several seeds)."""
    settings = load_settings(path, overrides)
    rows: list[dict[str, Any]] = []
    unlearned: list[Arrays] = []
    with staged(out) as folder:
        for index, (name, config) in enumerate(settings, start=1):
            print(f"[{index}/{len(settings)}] {name}", flush=True)
            (folder / name).mkdir(parents=True)
            outcome = execute(config, folder / name, show_progress)
            write_run(folder / name, config, outcome.result, outcome.info)
            rows.append(_row(name, config, outcome))
            unlearned.append(outcome.result.unlearned)
        compare_with_retrain(rows, unlearned)
        runs = pd.DataFrame(rows)
        runs.to_csv(folder / "runs.csv", index=False)
        table = summarize(runs)
        table.to_csv(folder / "table.csv", index=False)
        (folder / "table.md").write_text(markdown(table) + "\n")
    return table


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("setting", "model", "mode", "engine", "method") if c in runs.columns]
    numeric = [c for c in runs.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(runs[c])]
    grouped = runs.groupby(keys, sort=False, dropna=False)[numeric]
    table = grouped.mean().reset_index()
    if runs.groupby(keys, sort=False, dropna=False).size().max() > 1:
        std = grouped.std().add_suffix("_std").reset_index(drop=True)
        table = pd.concat([table, std], axis=1)
        table.insert(len(keys), "seeds", grouped.size().to_numpy())
    return table


def markdown(table: pd.DataFrame) -> str:
    """Means with ± std where there are several seeds."""
    shown = table[[c for c in table.columns if not c.endswith("_std")]].copy()
    for column in shown.columns:
        if f"{column}_std" in table.columns:
            shown[column] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(table[column], table[f"{column}_std"], strict=True)]
    return shown.to_markdown(index=False, floatfmt=".4f")
