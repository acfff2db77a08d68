"""Plots for results folders and reports (matplotlib, PNG, no screen needed).

Every plot has a title, labelled axes and a legend below the panels; series are told apart by a
colour-blind-safe palette (Okabe-Ito) and by marker or line style, never by colour alone."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from fedunlearn.fl.comparison import TARGETS_AGAINST_RETRAIN  # noqa: E402

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", "-.", ":")


def styles(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A colour and a marker (and a line style) per name, stable in the order given."""
    return {
        name: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINES[i % 4]}
        for i, name in enumerate(dict.fromkeys(names))
    }


def _finish(figure: Any, path: Path, title: str, grid: np.ndarray, legend: list[Any] | None = None) -> None:
    """Title, one legend below the panels (every series once, or the `legend` handles given), saved
    and closed."""
    handles: dict[str, Any] = {}
    for axis in grid.ravel():
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    for handle in legend or []:
        handles.setdefault(handle.get_label(), handle)
    figure.suptitle(title, fontsize=12)
    if handles:
        columns = min(4, len(handles))
        figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=9, frameon=False)
        rows = -(-len(handles) // columns)
        figure.tight_layout(rect=(0, min(0.45, (0.2 + 0.25 * rows) / figure.get_figheight()), 1, 0.95))
    else:
        figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_rounds(curves: dict[str, pd.DataFrame], events: dict[str, list[int]], path: Path) -> None:
    """HR@10 and NDCG@10 per round, one line per run group (the mean over its seeds, the band
    between the lowest and the highest seed), drop events as dotted vertical lines."""
    figure, grid = plt.subplots(1, 2, figsize=(11, 5), squeeze=False)
    style = styles(curves)
    for axis, metric in zip(grid[0], ("HR@10", "NDCG@10"), strict=True):
        for name, frame in curves.items():
            rows = frame.dropna(subset=[metric]).groupby("round")[metric]
            mean, low, high = rows.mean(), rows.min(), rows.max()
            axis.plot(mean.index, mean.to_numpy(), label=name, markersize=4, **style[name])
            if (high > low).any():
                axis.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=style[name]["color"], alpha=0.15)
            for event in events.get(name, []):
                axis.axvline(event, color=style[name]["color"], linestyle=":", linewidth=1)
        axis.set_xlabel("round (epoch for centralized runs)")
        axis.set_ylabel(f"{metric} (the clients present at each evaluation)")
        axis.set_title(metric)
    grid[0, 0].plot([], [], color="grey", linestyle=":", label="drop event (a run's colour)")
    _finish(figure, path, "Recommendation quality over the rounds", grid)


def _minus_retrain(table: pd.DataFrame, column: str) -> np.ndarray:
    """Each row's `column` minus Retrain's of the same run, model, event and seed, and where the rows
    carry it the same `retrain_key` (a Retrain of another protocol in the same run is not the
    reference); NaN where there is no such Retrain row."""
    keys = [c for c in ("run", "model", "event", "seed", "retrain_key") if c in table.columns]
    if "retrain_key" in keys:  # a compare row (unlearning.csv) has none: its run holds one Retrain
        table = table.assign(retrain_key=table["retrain_key"].fillna(""))
    retrain = table[table["method"] == "retrain"].drop_duplicates(keys).set_index(keys)[column]
    reference = retrain.reindex(pd.MultiIndex.from_frame(table[keys])).to_numpy(dtype=float)
    return table[column].to_numpy(dtype=float) - reference


def plot_unlearning(table: pd.DataFrame, path: Path) -> None:
    """Retained users' HR@10 right after the event, minus Retrain's of the same run, model, seed and
    event, against the speedup over Retrain, in wall time and in client-epochs, one point per row;
    zero and issue 12's band as the reference (one absolute Retrain line would mix events
    and models whose Retrain HR@10 differ by more than the methods do)."""
    figure, grid = plt.subplots(1, 2, figsize=(11, 5), squeeze=False)
    style = styles(table["method"])
    delta = _minus_retrain(table, "HR@10")
    band = TARGETS_AGAINST_RETRAIN["HR@10"]
    for axis, column, name in zip(grid[0], ("speedup_time", "speedup"), ("wall time", "client-epochs"), strict=True):
        for method, rows in table.groupby("method", sort=False):
            x = np.ones(len(rows)) if method == "retrain" else rows[column].to_numpy(dtype=float)
            y = delta[table.index.get_indexer(rows.index)]
            shown = np.isfinite(x) & np.isfinite(y)
            if shown.any():
                axis.scatter(x[shown], y[shown], s=60, label=method, color=style[method]["color"],
                             marker=style[method]["marker"])  # fmt: skip
        axis.axhspan(-band, band, color="grey", alpha=0.12, label=f"within {band} of Retrain")
        axis.axhline(0.0, color="grey", linestyle="--", label="Retrain")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.margins(0.15)
        axis.set_xlabel(f"speedup over Retrain ({name}, log scale)")
        axis.set_ylabel("retained HR@10 minus Retrain's")
        axis.set_title(f"Utility vs speedup ({name})")
    title = ("Unlearning: utility against cost (no client-epoch speedup where a method trained nothing, "
             "no wall-time one under 0.1 s)")
    _finish(figure, path, title, grid)


def plot_forgetting(table: pd.DataFrame, path: Path) -> None:
    """What each method leaves of the forgotten clients against Retrain: the membership-inference
    AUC on them and, under a poisoning attack, the attacked item's exposure ER@10, each minus
    Retrain's of the same run, model, seed and event (one point each; marker per run and event),
    with the target band. Absolute values pooled over runs and events would mix protocols whose
    Retrain values differ by more than the methods do (ER@10 0.60 at an early repeated event, 0.0
    after a single one)."""
    columns = [c for c in ("MIA_AUC", "ER@10") if c in table.columns and table[c].notna().any()]
    methods = [m for m in dict.fromkeys(table["method"]) if m != "retrain"]
    colours = styles(table["method"])  # as plot_unlearning's, Retrain's included: a method keeps its colour
    group_keys = [c for c in ("run", "model", "event") if c in table.columns]
    groups = table[group_keys].fillna("").astype(str).agg(" ".join, axis=1).str.strip()
    markers = styles(groups)
    figure, grid = plt.subplots(1, max(1, len(columns)), figsize=(max(11, 6 * len(columns)), 5.5), squeeze=False)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(table))  # fixed: the same picture every time
    for axis, column in zip(grid[0], columns, strict=False):
        delta = _minus_retrain(table, column)
        for position, method in enumerate(methods):
            for group in dict.fromkeys(groups):
                chosen = ((table["method"] == method) & (groups == group)).to_numpy() & np.isfinite(delta)
                if chosen.any():
                    axis.scatter(position + jitter[chosen], delta[chosen], s=45, color=colours[method]["color"],
                                 marker=markers[group]["marker"], edgecolor="black", linewidth=0.5)  # fmt: skip
        band = TARGETS_AGAINST_RETRAIN[column]
        axis.axhspan(-band, band, color="grey", alpha=0.15)
        axis.axhline(0.0, color="grey", linestyle="--")
        axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        axis.set_xlim(-0.6, len(methods) - 0.4)
        axis.set_xlabel("method")
        mia = column == "MIA_AUC"
        axis.set_ylabel(f"{'MIA AUC' if mia else 'ER@10'} minus Retrain's")
        axis.set_title("membership inference on the forgotten clients" if mia else "ER@10: the attacked item in top 10")
    handles = [Line2D([], [], color="grey", linestyle="--", label="Retrain (0)"),
               Patch(color="grey", alpha=0.15, label=f"target band (MIA +-{TARGETS_AGAINST_RETRAIN['MIA_AUC']}, "
                                                     f"ER@10 +-{TARGETS_AGAINST_RETRAIN['ER@10']})")]  # fmt: skip
    handles += [Patch(facecolor=colours[m]["color"], edgecolor="black", label=f"method: {m}") for m in methods]
    handles += [Line2D([], [], color="black", marker=markers[g]["marker"], linestyle="", markerfacecolor="white",
                       label=g) for g in markers]  # fmt: skip
    _finish(figure, path, "Unlearning: what is left of the forgotten clients, against Retrain (one point per seed)",
            grid, handles)  # fmt: skip


def plot_tradeoff(table: pd.DataFrame, path: Path, label: str = "defence") -> None:
    """Attack balanced accuracy (global audit, embeddings; a below-chance attacker flipped, where the
    table has that column) against NDCG@10, colour per defence, marker per attacker, one panel per
    attribute and one row of panels per run (or model) where there are several, chance dashed."""
    chosen = table[(table["audit"] == "global") & (table["view"] == "embedding")]
    accuracy = "balanced_accuracy_relabelled" if "balanced_accuracy_relabelled" in chosen else "balanced_accuracy"
    attributes = list(dict.fromkeys(chosen["attribute"]))
    split = next((c for c in ("run", "model") if c in chosen.columns and chosen[c].nunique() > 1), None)
    runs = list(dict.fromkeys(chosen[split])) if split else [None]
    figure, grid = plt.subplots(len(runs), len(attributes), figsize=(5 * len(attributes), 4.2 * len(runs) + 1),
                                squeeze=False)  # fmt: skip
    colours = styles(chosen[label])
    markers = styles(chosen["attacker"])
    for row, run in enumerate(runs):
        for axis, attribute in zip(grid[row], attributes, strict=True):
            rows = chosen[(chosen["attribute"] == attribute) & ((chosen[split] == run) if split else True)]
            for (defence, attacker), group in rows.groupby([label, "attacker"], sort=False):
                axis.scatter(group["NDCG@10"], group[accuracy], s=50, color=colours[defence]["color"],
                             marker=markers[attacker]["marker"], edgecolor="black", linewidth=0.5)  # fmt: skip
            if len(rows):
                axis.axhline(rows["chance"].mean(), linestyle="--", color="grey")  # seeds' test splits differ
            axis.margins(0.15)
            axis.set_xlabel("NDCG@10 after the defence")
            axis.set_ylabel("attack balanced accuracy" + (" (relabelled)" if accuracy.endswith("relabelled") else ""))
            axis.set_title(f"{run}: {attribute}" if run else attribute)
    handles = [Patch(facecolor=colours[d]["color"], edgecolor="black", label=f"{label}: {d}") for d in colours]
    handles += [Line2D([], [], color="black", marker=markers[a]["marker"], linestyle="", markerfacecolor="white",
                       label=f"attacker: {a}") for a in markers]  # fmt: skip
    handles.append(Line2D([], [], color="grey", linestyle="--", label="chance (mean over seeds)"))
    _finish(figure, path, f"Attribute privacy against utility ({label} by colour, attacker by marker)", grid, handles)


def plot_embeddings(before: np.ndarray, after: np.ndarray, attributes: pd.DataFrame, path: Path) -> None:
    """Per-class embedding distributions before and after the defence, for each attribute: every
    user on the two main axes of the embeddings before the defence (the same axes and limits after)."""
    names = list(attributes.columns)
    centre = before.mean(0)
    basis = np.linalg.svd(before - centre, full_matrices=False)[2][:2].T
    shown = {"before": (before - centre) @ basis, "after": (after - centre) @ basis}
    both = np.concatenate(list(shown.values()))
    pad = 0.05 * (both.max(0) - both.min(0))
    low, high = both.min(0) - pad, both.max(0) + pad
    figure, grid = plt.subplots(len(names), 2, figsize=(13, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        labels = attributes[name].astype(str).to_numpy()
        values = sorted(set(labels))[:8]  # the first eight classes (age and occupation have more)
        style = styles(values)
        for column, (title, projected) in enumerate(shown.items()):
            axis = grid[row, column]
            for value in values:
                chosen = labels == value
                axis.scatter(projected[chosen, 0], projected[chosen, 1], s=8, alpha=0.6, label=value,
                             color=style[value]["color"], marker=style[value]["marker"])  # fmt: skip
            axis.set_xlim(low[0], high[0])
            axis.set_ylim(low[1], high[1])
            axis.set_xlabel("SVD direction 1 (of the embeddings before)")
            axis.set_ylabel("SVD direction 2")
            axis.set_title(f"{name}: {title} the defence")
        more = f" (first 8 of {len(set(labels))})" if len(set(labels)) > 8 else ""
        grid[row, 1].legend(title=f"{name}{more}", loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=2,
                            fontsize=8)  # fmt: skip
    figure.suptitle("User embeddings by class, before and after the defence", fontsize=12)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_audit_views(table: pd.DataFrame, path: Path) -> None:
    """Global against local audit, per attribute and defence: the central attacker's balanced
    accuracy (relabelled), and of the clients' own view the share at risk and the worst class's."""
    embedding = table[table["view"] == "embedding"]
    accuracy = "balanced_accuracy_relabelled" if "balanced_accuracy_relabelled" in embedding else "balanced_accuracy"
    keys = ["attribute", "defence", *(["seed"] if "seed" in embedding else [])]

    def worst(audit: str, column: str) -> pd.Series:
        """The strongest attacker's value in each run, then the mean over seeds."""
        rows = embedding[embedding["audit"] == audit].groupby(keys, sort=False)[column].max()
        return rows.groupby(level=[0, 1], sort=False).mean()

    series = {"global: attack balanced accuracy (best attacker)": worst("global", accuracy)}
    if not embedding[embedding["audit"] == "local"].empty:
        series["local: share of clients at risk (worst attacker)"] = worst("local", "at_risk")
        series["local: worst class's share at risk"] = worst("local", "worst_class_at_risk")
    frame = pd.DataFrame(series)
    attributes = list(dict.fromkeys(frame.index.get_level_values(0)))
    figure, grid = plt.subplots(1, len(attributes), figsize=(5.5 * len(attributes), 5), squeeze=False)
    style = styles(frame.columns)
    hatches = ["", "//", ".."]
    for axis, attribute in zip(grid[0], attributes, strict=True):
        part = frame.loc[attribute]
        width = 0.8 / len(frame.columns)
        for k, column in enumerate(frame.columns):
            axis.bar(np.arange(len(part)) + k * width, part[column], width, label=column, edgecolor="black",
                     color=style[column]["color"], hatch=hatches[k % 3])  # fmt: skip
        axis.set_xticks(np.arange(len(part)) + 0.4 - width / 2, list(part.index), rotation=30, ha="right")
        axis.set_ylim(0, 1)
        axis.set_ylabel("accuracy or share of clients")
        axis.set_xlabel("defence")
        axis.set_title(attribute)
    _finish(figure, path, "Attribute audit: the central party's view against each client's own exposure", grid)


def plot_time(table: pd.DataFrame, path: Path) -> None:
    """Seconds per training round of each run group (mean over rounds and seeds), labelled with its
    engine and federation size."""
    figure, grid = plt.subplots(1, 1, figsize=(max(6.0, 1.2 * len(table) + 3), 5), squeeze=False)
    axis = grid[0, 0]
    style = styles(table["engine"])
    for position, row in enumerate(table.itertuples(index=False)):
        axis.bar(position, row.seconds_per_round, color=style[row.engine]["color"], edgecolor="black",
                 label=f"engine: {row.engine}")  # fmt: skip
        where = (position, row.seconds_per_round)
        axis.annotate(f"{round(row.clients)} clients", where, ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(table)), list(table["run"]), rotation=30, ha="right")
    axis.set_ylabel("seconds per round (wall; drop events included)")
    axis.set_xlabel("run")
    axis.set_title("Round time by run (memory per engine: benchmarks/engines.py)")
    _finish(figure, path, "Time per round", grid)


def plot_scalability(engines: pd.DataFrame, scaling: pd.DataFrame, path: Path) -> None:
    """benchmarks/engines.py's tables: each engine's seconds per ML-100K round (bars, log scale, peak
    memory written on each), and the batched engine's seconds per round and peak memory as the
    synthetic federation grows (log-log)."""
    figure, grid = plt.subplots(1, 2, figsize=(12, 5), squeeze=False)
    left, right = grid[0]
    per_round = "s per round, 943 clients"
    timed = engines.dropna(subset=[per_round]) if per_round in engines else engines[:0]  # failed engines: no bar
    style = styles(timed.get("engine", []))
    for position, (_, row) in enumerate(timed.iterrows()):
        seconds, memory, engine = row[per_round], row["peak RSS MiB"], row["engine"]
        left.bar(position, seconds, color=style[engine]["color"], edgecolor="black", label=f"engine: {engine}")
        left.annotate(f"{seconds:.2f} s, {memory:.0f} MiB", (position, seconds), ha="center", va="bottom", fontsize=8)
    if timed.empty:
        left.text(0.5, 0.5, "no engine timed on ML-100K", ha="center", va="center", transform=left.transAxes)
    else:  # from a decade below the fastest: bars of close values look close, not 20x apart
        left.set_yscale("log")
        left.set_ylim(bottom=10 ** np.floor(np.log10(timed[per_round].min())) / 10)
    left.set_xticks(range(len(timed)), list(timed.get("engine", [])))
    left.set_xlabel("engine")
    left.set_ylabel("seconds per round, 943 clients (log)")
    left.set_title("ML-100K: every client in every round")
    sized = scaling.dropna(subset=["s per round"]) if "s per round" in scaling else scaling[:0]
    clients = sized.get("clients", [])
    right.plot(clients, sized.get("s per round", []), marker="o", color=PALETTE[0], label="s per round (batched)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("clients in the federation (10% per round, log)")
    right.set_ylabel("seconds per round (log)")
    right.set_title("Synthetic federations: batched engine")
    memory_axis = right.twinx()
    memory_axis.plot(clients, sized.get("peak RSS MiB", []), marker="s", linestyle="--", color=PALETTE[1],
                     label="peak RSS MiB (whole job)")  # fmt: skip
    memory_axis.set_ylabel("peak resident memory, MiB")
    legend = [Line2D([], [], marker="s", linestyle="--", color=PALETTE[1], label="peak RSS MiB (whole job)")]
    _finish(figure, path, "Scalability: time per round and memory per engine and federation size", grid, legend)
