"""The post-training defences of an attribute experiment (e.g. experiments/attribute_ml100k.toml
--only trained), one row per setting / model and defence: each attack's balanced accuracy from the
embeddings (global audit) as given / relabelled and its relabelled AUC (a below-chance seed read the
right way round: as-given AUCs of 0.40 and 0.60 would average to a chance-looking 0.50), mean over
seeds, and on how many seeds the relabelled figure passed its own `null_95` (the level answers
carrying nothing reach in 95% of label permutations: where a mean a few hundredths above chance
is still read, not noise); the NDCG@10 change against the undefended model of the same seed (mean
and per seed); the defence's steps (mean).

    python benchmarks/defence_table.py results/attribute_ml100k
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fedunlearn.runs.report import run_name


def run_rows(folder: Path, run: str, seed: str) -> pd.DataFrame:
    """The embedding view's global audit rows of one run, with its NDCG@10 change per defence (none
    where the run has no undefended model to compare with, e.g. one trained under an upload defence)."""
    audit = pd.read_csv(folder / "audit.csv")
    audit = audit[(audit["audit"] == "global") & (audit["view"] == "embedding")].copy()
    trained = audit.loc[audit["defence"] == "none", "NDCG@10"]
    audit["ndcg_change"] = 100 * (audit["NDCG@10"] / trained.iloc[0] - 1) if len(trained) else float("nan")
    audit["run"] = run
    audit["seed"] = seed
    return audit


def past_null(cell: pd.DataFrame) -> int:
    """Seeds whose relabelled balanced accuracy is above the audit's null_95 (audits before
    2026-12-07 have no null_95: an error, not a count of zero)."""
    if "null_95" not in cell or cell["null_95"].isna().any():
        raise SystemExit("an audit.csv has no null_95 (written before 2026-12-07): run the audit again")
    return int((cell["balanced_accuracy_relabelled"] > cell["null_95"]).sum())


def chance_text(rows: pd.DataFrame, attribute: str) -> str:
    """The attribute's chance level, or its range where runs saw different numbers of classes."""
    chances = rows.loc[rows["attribute"] == attribute, "chance"]
    low, high = chances.min(), chances.max()
    return f"{low:.3f}" if high - low < 5e-4 else f"{low:.3f}-{high:.3f}"


def table(experiment: Path) -> pd.DataFrame:
    folders = sorted(path.parent for path in experiment.glob("**/audit.csv"))
    if not folders:
        raise SystemExit(f"{experiment}: no run folders with an audit.csv found")
    rows = pd.concat([run_rows(folder, *run_name(experiment, folder)) for folder in folders], ignore_index=True)
    out = []
    for (run, defence), block in rows.groupby(["run", "defence"], sort=False):
        row = {"run": run, "defence": defence, "seeds": block["seed"].nunique()}
        for (attribute, attacker), cell in block.groupby(["attribute", "attacker"], sort=False):
            complete = cell["seed"].nunique() == row["seeds"]  # a seed that did not attack it: no mean over the rest
            row[f"{attribute} {attacker} (chance {chance_text(rows, attribute)})"] = (
                f"{cell['balanced_accuracy'].mean():.3f} / {cell['balanced_accuracy_relabelled'].mean():.3f}"
                f" (AUC {cell['auc_relabelled'].mean():.2f}; {past_null(cell)}/{row['seeds']} > null)"
                if complete
                else "-"
            )
        per_seed = block.groupby("seed")["ndcg_change"].first()
        signed = lambda value: f"{round(value, 1) + 0.0:+.1f}"  # noqa: E731  (+ 0.0: never print -0.0)
        row["NDCG@10 change"] = (
            f"{signed(per_seed.mean())}% ({' / '.join(signed(v) for v in per_seed)})" if per_seed.notna().all() else "-"
        )
        steps = block.groupby("seed")["steps"].first() if "steps" in block else pd.Series(dtype=float)
        row["steps"] = f"{steps.mean():.0f}" if steps.notna().any() else "-"
        out.append(row)
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the experiment's results folder")
    args = parser.parse_args()
    print(table(args.experiment).to_markdown(index=False))


if __name__ == "__main__":
    main()
