"""What the server reads from one upload, per setting of an experiment with the audit on (e.g.
experiments/ldp_epsilon_ml100k.toml): the model's HR@10 / NDCG@10, the upload-structure attack's
recovered interactions (precision, recall) and direction (cosine to the true embedding), and the
balanced accuracy of each attribute attack from the embeddings, the norm-profile upload view and the
recovered directions (global audit). Mean ± std over the seeds of each setting (the sample std,
ddof 1, as in `fedunlearn report`; the line under the table says so), the mean alone for a setting
of one seed; "-" where a seed lacks the figure (a view not attacked, an attack that read no
client), rather than a mean over the others.

    python benchmarks/upload_attack_table.py results/ldp_epsilon_ml100k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fedunlearn.runs.report import run_name

VIEWS = ("embedding", "upload", "upload-direction", "upload-items")


def run_row(folder: Path, setting: str, seed: str) -> list[dict]:
    """One row per attacker and attribute of the run in `folder` (its final.json and audit.csv)."""
    final = json.loads((folder / "final.json").read_text())
    recovery = final.get("upload_attack")
    if not recovery:
        raise SystemExit(f"{folder}: no upload_attack in final.json; run with audit.enabled = true")
    audit = pd.read_csv(folder / "audit.csv")
    audit = audit[(audit["audit"] == "global") & audit["view"].isin(VIEWS)]
    audit = audit[audit["defence"] == audit["defence"].iloc[0]]  # the model as trained (not a post-training defence)
    rows = []
    for (attacker, attribute), block in audit.groupby(["attacker", "attribute"], sort=False):
        accuracy = dict(zip(block["view"], block["balanced_accuracy"], strict=True))
        row = {"setting": setting, "seed": seed, "attacker": attacker, "attribute": attribute}
        row |= {"HR@10": block["HR@10"].iloc[0], "NDCG@10": block["NDCG@10"].iloc[0]}
        row |= {key: recovery[key] for key in ("precision", "recall", "cosine")}
        rows.append(row | {f"BA {view}": accuracy.get(view, float("nan")) for view in VIEWS})
    return rows


def table(experiment: Path) -> pd.DataFrame:
    folders = sorted(path.parent for path in experiment.glob("**/final.json"))
    if not folders:
        raise SystemExit(f"{experiment}: no run folders (SETTING[/MODEL]/SEED/final.json) found")
    runs = pd.DataFrame([row for folder in folders for row in run_row(folder, *run_name(experiment, folder))])
    listed = experiment / "runs.csv"  # the experiment's own order of settings (folders sort by name)
    named = list(dict.fromkeys(pd.read_csv(listed)["run"])) if listed.exists() else []
    rank = lambda setting: named.index(setting.split("/")[0]) if setting.split("/")[0] in named else len(named)  # noqa: E731
    values = [column for column in runs.columns if column not in ("setting", "seed", "attacker", "attribute")]
    rows = []
    for (setting, attacker, attribute), block in runs.groupby(["setting", "attacker", "attribute"], sort=False):
        row = {"setting": setting, "attacker": attacker, "attribute": attribute, "seeds": len(block)}
        spread = lambda column: f" ± {block[column].std(ddof=1):.3f}" if len(block) > 1 else ""  # noqa: E731
        rows.append(row | {column: f"{block[column].mean():.3f}{spread(column)}" if block[column].notna().all()
                           else "-" for column in values})  # fmt: skip
    out = pd.DataFrame(rows)
    return out.sort_values("setting", key=lambda column: column.map(rank), kind="stable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="an experiment's --out folder")
    print(table(parser.parse_args().experiment).to_markdown(index=False))
    print("\nmean ± sample std (ddof 1) over each setting's seeds; the mean alone for one seed")


if __name__ == "__main__":
    main()
