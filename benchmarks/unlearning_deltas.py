"""Each unlearning method against Retrain of the same model, seed and event, per seed, from an
unlearning experiment's runs.csv, checked against issue 12's targets (|ΔHR@10| and |ΔER@10| within
0.02, |ΔMIA AUC| within 0.03):

    python benchmarks/unlearning_deltas.py results/unlearning_ml100k/runs.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

from fedunlearn.fl.comparison import TARGETS_AGAINST_RETRAIN


def deltas(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method, model and event: Retrain's mean HR@10, the Δ per seed, and whether every
    seed meets every target."""
    keys = ["model", "event"] if "event" in runs else ["model"]
    runs = runs[runs["status"] == "ok"] if "status" in runs else runs
    reference = runs[runs["method"] == "retrain"].set_index([*keys, "seed"])
    rows = []
    for (method, *group), block in runs.groupby(["method", *keys], sort=False):
        block = block.sort_values("seed")
        base = reference.loc[[(*group, seed) for seed in block["seed"]]]
        row = dict(zip(["method", *keys], [method, *group], strict=True))
        row["retrain HR@10"] = f"{base['HR@10'].mean():.4f}"
        met = True
        for metric, bound in TARGETS_AGAINST_RETRAIN.items():
            delta = block[metric].to_numpy() - base[metric].to_numpy()
            row[f"Δ{metric} per seed"] = " / ".join(f"{d:+.3f}" for d in delta)
            met &= bool((abs(delta) <= bound + 1e-9).all())  # a bound is met when reached (float rounding)
        columns = ("speedup_time", "speedup", "speedup_steps")
        speedups = [block[column].to_numpy().mean() for column in columns if column in block]  # a NaN stays NaN
        measured = len(speedups) == 3 and all(pd.notna(value) for value in speedups)  # none trains nothing
        row["wall x / epochs x / steps x"] = " / ".join(f"{value:.2f}" for value in speedups) if measured else "-"
        row["seeds"] = len(block)
        row["targets met"] = "yes" if met else "no"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="an unlearning experiment's runs.csv")
    args = parser.parse_args()
    table = deltas(pd.read_csv(args.runs))
    print(table[table["method"] != "retrain"].to_markdown(index=False))


if __name__ == "__main__":
    main()
