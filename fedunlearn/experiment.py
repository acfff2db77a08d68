"""`fedunlearn experiment FILE.toml`: a table's worth of settings, one row each.

File format: an optional `[base]` table of `section.key = value` settings shared by every row, then
one `[[setting]]` per row with a `name` and its own `set` table, e.g.

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

from fedunlearn.config import Config, apply_mapping, load_overrides, read_toml, validate
from fedunlearn.errors import FedUnlearnError
from fedunlearn.results import staged, write_run
from fedunlearn.runner import execute


def load_settings(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str, Config]]:
    spec = read_toml(path)
    unknown = set(spec) - {"base", "setting", "title"}
    if unknown:
        raise FedUnlearnError(f"{path}: unknown tables {sorted(unknown)}; use [base] and [[setting]]")
    settings = spec.get("setting", [])
    if not settings:
        raise FedUnlearnError(f"{path} has no [[setting]] rows: add at least one")
    out, names = [], set()
    for row in settings:
        name = row.get("name")
        if not name or name in names:
            raise FedUnlearnError(f"{path}: every [[setting]] needs a unique name; got {name!r}")
        names.add(name)
        config = Config()
        apply_mapping(config, spec.get("base", {}))
        apply_mapping(config, row.get("set", {}))
        load_overrides(config, overrides or [])
        out.append((name, validate(config)))
    return out


def run_experiment(
    path: str | Path, out: str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> pd.DataFrame:
    settings = load_settings(path, overrides)
    rows: list[dict[str, Any]] = []
    with staged(out) as folder:
        for index, (name, config) in enumerate(settings, start=1):
            print(f"[{index}/{len(settings)}] {name}", flush=True)
            (folder / name).mkdir()
            outcome = execute(config, folder / name, show_progress)
            write_run(folder / name, config, outcome.result, outcome.info)
            metrics = {k: v for k, v in outcome.result.final.items() if "@" in k}
            rows.append(
                {
                    "setting": name,
                    "model": config.model.name,
                    "mode": config.run.mode,
                    "engine": config.run.engine if config.run.mode == "federated" else "-",
                    "round": outcome.result.final.get("round", 0),
                    **metrics,
                    "seconds": outcome.info["seconds"],
                }
            )
        table = pd.DataFrame(rows)
        table.to_csv(folder / "table.csv", index=False)
        (folder / "table.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return table
