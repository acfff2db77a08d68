"""Plots for the results folder (matplotlib, PNG, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_embeddings(report: Any, path: Path) -> None:
    """Per-class embedding distributions before and after the defence, for each attribute: every
    user on the two main axes of the embeddings before the defence (the same axes after)."""
    names = list(report.attributes.columns)
    centred = report.users_before - report.users_before.mean(0)
    axes_basis = np.linalg.svd(centred, full_matrices=False)[2][:2].T
    figure, grid = plt.subplots(len(names), 2, figsize=(10, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        labels = report.attributes[name].astype(str).to_numpy()
        for column, (title, embeddings) in enumerate((("before", report.users_before), ("after", report.users_after))):
            projected = (embeddings - report.users_before.mean(0)) @ axes_basis
            axis = grid[row, column]
            for value in np.unique(labels):
                chosen = labels == value
                axis.scatter(projected[chosen, 0], projected[chosen, 1], s=4, alpha=0.5, label=value)
            axis.set_title(f"{name}: {title} the defence")
        if len(np.unique(labels)) <= 8:
            grid[row, 0].legend(markerscale=3, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_tradeoff(table: pd.DataFrame, path: Path, label: str = "defence") -> None:
    """Attack balanced accuracy (global audit, embeddings) against NDCG@10, one point per defence
    (and strength, when the table has several), one panel per attribute, chance as a dashed line."""
    chosen = table[(table["audit"] == "global") & (table["view"] == "embedding")]
    attributes = list(dict.fromkeys(chosen["attribute"]))
    figure, grid = plt.subplots(1, len(attributes), figsize=(5 * len(attributes), 4), squeeze=False)
    for axis, attribute in zip(grid[0], attributes, strict=True):
        rows = chosen[chosen["attribute"] == attribute]
        for (defence, attacker), group in rows.groupby([label, "attacker"], sort=False):
            axis.scatter(group["NDCG@10"], group["balanced_accuracy"], label=f"{defence} / {attacker}")
        axis.axhline(rows["chance"].iloc[0], linestyle="--", color="grey")
        axis.set_xlabel("NDCG@10")
        axis.set_ylabel("attack balanced accuracy")
        axis.set_title(attribute)
    grid[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def privacy_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The demo's short table: per defence, attribute and attacker on the embeddings, the global
    balanced accuracy (as answered, and relabelled: a below-chance attacker flipped, the information
    left) against chance, the local audit's share at risk, and NDCG@10."""
    embedding = table[table["view"] == "embedding"]
    keys = ["defence", "attribute", "attacker"]
    columns = [*keys, "balanced_accuracy", "balanced_accuracy_relabelled", "chance", "NDCG@10"]
    global_rows = embedding[embedding["audit"] == "global"][columns]
    local = embedding[embedding["audit"] == "local"]
    if local.empty:  # audit.local = false
        return global_rows
    local_rows = local[[*keys, "at_risk"]].rename(columns={"at_risk": "local_at_risk"})
    return global_rows.merge(local_rows, on=keys, how="left")
