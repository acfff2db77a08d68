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
    (folder / "final.json").write_text(json.dumps(final, indent=2, allow_nan=False) + "\n")  # NaN is no result
    (folder / "summary.md").write_text(summary_markdown(config, result, info or {}))
    if result.unlearned:
        np.savez_compressed(folder / "unlearned.npz", **result.unlearned)
    if result.privacy is not None:
        write_privacy(folder, config, result.privacy)
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


def write_privacy(folder: Path, config: Config, report: Any) -> None:
    """audit.csv / audit.md, the embeddings the global audit saw (the central view: a simulation
    privilege, for `fedunlearn audit` and the plots) and the plots."""
    from fedunlearn.report import plot_embeddings, plot_tradeoff

    report.table.to_csv(folder / "audit.csv", index=False)
    (folder / "audit.md").write_text(report.table.to_markdown(index=False, floatfmt=".4f") + "\n")
    arrays = {"before": report.users_before} | ({} if report.users_after is None else {"after": report.users_after})
    np.savez_compressed(folder / "central_view_embeddings.npz", clients=np.array(report.client_ids), **arrays)
    if report.users_after is not None:
        plot_embeddings(report, folder / "embeddings.png")
    plot_tradeoff(report.table, folder / "tradeoff.png")
