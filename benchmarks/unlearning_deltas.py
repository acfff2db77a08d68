"""Each unlearning method against Retrain of the same model, seed and event, per seed, from an
unlearning experiment's runs.csv, checked against issue 12's targets (|ΔHR@10| and |ΔER@10| within
0.02, |ΔMIA AUC| within 0.03):

    python benchmarks/unlearning_deltas.py results/unlearning_ml100k/runs.csv

Each setting is judged against the Retrain of its own `retrain_key` (the runs' config but the method).
Retrain twins: where the experiment also ran Retrain under other settings no method is judged
against (the same data and drops, another `run.train_seed`; experiments/unlearning_twins_ml100k.toml),
the twins give Retrain's own spread: per seed, the range of the twins'
HR@10 minus the reference's, and for every method whether its HR@10 lies within the range of all
the Retrains (reference and twins) of that seed.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from fedunlearn.fl.comparison import TARGETS_AGAINST_RETRAIN


def deltas(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (or method), model and event: Retrain's mean HR@10, the Δ per seed, and
    whether every seed meets every target. Each row's reference is the Retrain of its own
    `retrain_key` (everything but the method), so two settings of one method under other protocols
    are never judged against one Retrain; Retrains no other row is judged against are twins."""
    keys = ["model", "event"] if "event" in runs else ["model"]
    runs = runs[runs["status"] == "ok"] if "status" in runs else runs
    retrains = runs[runs["method"] == "retrain"]
    keyed = "retrain_key" in runs and runs.loc[runs["method"].notna(), "retrain_key"].notna().all()
    runs = runs[runs["method"].notna()]  # a setting without a drop has no event row
    if keyed:
        judged = set(runs.loc[runs["method"] != "retrain", "retrain_key"])
        twins = retrains[~retrains["retrain_key"].isin(judged)] if judged else retrains[:0]
    else:  # a runs.csv from before the key: the setting named "retrain" is the reference
        twinned = "setting" in runs and (retrains["setting"] != "retrain").any()
        twins = retrains[retrains["setting"] != "retrain"] if twinned else retrains[:0]
    reference = retrains.drop(twins.index).set_index([*keys, "seed", *(["retrain_key"] if keyed else [])])
    runs = runs.drop(twins.index)
    by = ["setting", "method"] if "setting" in runs else ["method"]
    judged = judged_metrics(runs)
    rows = []
    for values, block in runs.groupby([*by, *keys], sort=False):
        names, group = values[: len(by)], values[len(by) :]
        block = block.sort_values("seed")
        lookup = [(*group, row["seed"], *([row["retrain_key"]] if keyed else [])) for _, row in block.iterrows()]
        judged_seeds = np.array([key in reference.index for key in lookup], dtype=bool)  # a failed Retrain: none
        unjudged = block.loc[~judged_seeds, "seed"].tolist()
        missing = f" (no Retrain for seed {', '.join(map(str, unjudged))})" if unjudged else ""
        block, lookup = block[judged_seeds], [key for key, ok in zip(lookup, judged_seeds, strict=True) if ok]
        row = dict(zip([*by, *keys], [*names, *group], strict=True))
        if block.empty:  # no seed of this group has a Retrain: said, not dropped
            rows.append(row | {"seeds": f"0{missing}"})
            continue
        base = reference.loc[lookup]
        row["retrain HR@10"] = f"{base['HR@10'].mean():.4f}"
        met = True
        for metric, bound in TARGETS_AGAINST_RETRAIN.items():
            if metric not in judged:
                row[f"Δ{metric} per seed"] = "-"
                continue
            delta = block[metric].to_numpy() - base[metric].to_numpy()
            row[f"Δ{metric} per seed"] = " / ".join(f"{d:+.3f}" for d in delta)
            met &= bool((abs(delta) <= bound + 1e-9).all())  # a bound is met when reached (float rounding)
        columns = ("speedup_time", "speedup", "speedup_steps")
        speedups = [block[column].to_numpy().mean() for column in columns if column in block]  # a NaN stays NaN
        measured = len(speedups) == 3 and all(pd.notna(value) for value in speedups)  # none trains nothing
        row["wall x / epochs x / steps x"] = " / ".join(f"{value:.2f}" for value in speedups) if measured else "-"
        row["seeds"] = f"{len(block)}{missing}" if missing else len(block)
        row["targets met"] = "yes" if met else "no"
        if len(twins):
            row |= _against_twins(block, base, twins, dict(zip(keys, group, strict=True)))
        rows.append(row)
    return pd.DataFrame(rows)


def judged_metrics(runs: pd.DataFrame) -> list[str]:
    """The targets' metrics every run has (ER@10 only where the runs promote an item: unlearn.poison)."""
    return [metric for metric in TARGETS_AGAINST_RETRAIN if metric in runs and runs[metric].notna().all()]


def _against_twins(block: pd.DataFrame, base: pd.DataFrame, twins: pd.DataFrame, group: dict) -> dict[str, str]:
    """Per seed: the twins' HR@10 minus the reference Retrain's (their range), and whether the
    method's HR@10 lies within the range of every Retrain of that seed."""
    spread, inside = [], []
    for (_, own), reference in zip(block.iterrows(), base["HR@10"], strict=True):
        mine = twins[(twins["seed"] == own["seed"]) & (twins[list(group)] == pd.Series(group)).all(axis=1)]
        values = [reference, *mine["HR@10"]]
        spread.append(f"{min(values) - reference:+.3f}..{max(values) - reference:+.3f}")
        inside.append("yes" if min(values) - 1e-9 <= own["HR@10"] <= max(values) + 1e-9 else "no")
    return {"Retrain twins ΔHR@10 per seed": " / ".join(spread), "HR@10 within the Retrains": " / ".join(inside)}


def undiscriminating(table: pd.DataFrame) -> list[str]:
    """The targets that `none` (no unlearning at all) meets on every seed of a model and event: there
    a method meeting them shows nothing (the leaving clients' MIA AUC is scored with their own
    trained user parts, so it stays high whatever happens to the shared model)."""
    notes = []
    for _, row in table[table["method"] == "none"].iterrows():
        where = ", ".join(f"{key} {row[key]}" for key in ("model", "event") if key in row)
        for metric, bound in TARGETS_AGAINST_RETRAIN.items():
            if row.get(f"Δ{metric} per seed", "-") == "-":
                continue
            deltas_per_seed = [float(value) for value in str(row[f"Δ{metric} per seed"]).split(" / ")]
            if all(abs(delta) <= bound + 1e-9 for delta in deltas_per_seed):
                notes.append(f"{where}: `none` (no unlearning) also has |Δ{metric}| within {bound} on every seed, "
                             f"so that target does not tell unlearning from doing nothing here")  # fmt: skip
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="an unlearning experiment's runs.csv")
    args = parser.parse_args()
    table = deltas(pd.read_csv(args.runs))
    if table.empty:
        raise SystemExit(f"{args.runs}: no unlearning row to judge (no finished run with a drop event)")
    table = table.fillna("-")  # a group no seed of which had a Retrain has no figures
    print(table[table["method"] != "retrain"].to_markdown(index=False))
    unjudged = [metric for metric in TARGETS_AGAINST_RETRAIN
                if (table.get(f"Δ{metric} per seed", pd.Series("-", index=table.index)) == "-").all()]  # fmt: skip
    if unjudged:
        print(f"\nnote: not judged ('-'), some run lacks it: {', '.join(unjudged)} (ER@10 needs unlearn.poison)")
    for note in undiscriminating(table):
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
