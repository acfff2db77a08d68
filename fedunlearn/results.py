"""Results folders: written under a `.partial` name and renamed only when complete, so a failed run
never leaves a folder that looks finished."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.rounds import FederationResult


def check_free(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise FedUnlearnError(f"results folder {out} already exists: choose another --out or remove it")
    return out


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder that becomes `out` only if the block finishes without error."""
    out = check_free(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)


def write_run(folder: str | Path, config: Config, result: FederationResult, info: dict[str, Any] | None = None) -> None:
    """Resolved config, per-round metrics CSV, final metrics JSON and a short Markdown summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(tomli_w.dumps(config.to_dict()))
    pd.DataFrame(result.rounds).to_csv(folder / "metrics.csv", index=False)
    final = {"engine": config.run.engine, "mode": config.run.mode, **(info or {}), "metrics": result.final}
    (folder / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_markdown(config, result, info or {}))
    if result.unlearned:
        np.savez_compressed(folder / "unlearned.npz", **result.unlearned)
    if result.comparison:
        table = pd.DataFrame(result.comparison)
        table.to_csv(folder / "unlearning.csv", index=False)
        (folder / "unlearning.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")


def summary_markdown(config: Config, result: FederationResult, info: dict[str, Any]) -> str:
    metrics = {k: v for k, v in result.final.items() if "@" in k}
    table = pd.DataFrame([metrics]).to_markdown(index=False, floatfmt=".4f")
    lines = [
        f"# fedunlearn run: {config.model.name.upper()} on {config.data.dataset} ({config.run.mode})",
        "",
        f"- engine: {config.run.engine}" if config.run.mode == "federated" else f"- mode: {config.run.mode}",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        table,
        "",
    ]
    return "\n".join(lines)
