import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from upload_attack_table import table  # noqa: E402


def write_run(folder: Path, hr: float, precision: float, accuracies: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    final = {"upload_attack": {"precision": precision, "recall": 1.0, "cosine": 0.5, "clients": 3}}
    (folder / "final.json").write_text(json.dumps(final))
    rows = [
        {"defence": "none", "view": view, "attacker": "mlp", "attribute": "gender", "audit": audit,
         "balanced_accuracy": value, "HR@10": hr, "NDCG@10": hr / 2}
        for view, value in accuracies.items() for audit in ("global", "local")
    ]  # fmt: skip
    rows.append(rows[0] | {"defence": "attrcloak-dd", "balanced_accuracy": 0.1})  # a later defence: not read
    pd.DataFrame(rows).to_csv(folder / "audit.csv", index=False)


def test_the_table_averages_each_setting_over_its_seeds_in_the_experiments_order(tmp_path):
    views = {"embedding": 0.6, "upload": 0.55, "upload-direction": 0.58}
    write_run(tmp_path / "ldp-eps8" / "seed0", 0.2, 0.3, views)
    write_run(tmp_path / "ldp-eps8" / "seed1", 0.4, 0.1, views | {"upload-direction": 0.52})
    write_run(tmp_path / "none" / "seed0", 0.6, 0.9, views)
    pd.DataFrame({"run": ["none", "ldp-eps8"]}).to_csv(tmp_path / "runs.csv", index=False)
    out = table(tmp_path)
    assert list(out["setting"]) == ["none", "ldp-eps8"]
    ldp = out.set_index("setting").loc["ldp-eps8"]
    assert ldp["seeds"] == 2
    assert ldp["HR@10"] == "0.300 ± 0.141"  # the sample std, as the report's
    assert ldp["precision"] == "0.200 ± 0.141"
    assert ldp["BA upload-direction"] == "0.550 ± 0.042"
    assert ldp["BA embedding"] == "0.600 ± 0.000"
    assert out.set_index("setting").loc["none", "HR@10"] == "0.600"  # one seed: no spread to show


def test_settings_without_seed_folders_are_not_averaged_together(tmp_path):
    views = {"embedding": 0.6, "upload": 0.55, "upload-direction": 0.58}
    write_run(tmp_path / "retrain", 0.2, 0.3, views)  # an experiment without a seeds list: SETTING/final.json
    write_run(tmp_path / "fru", 0.4, 0.1, views)
    out = table(tmp_path).set_index("setting")
    assert out.loc["retrain", "HR@10"] == "0.200" and out.loc["fru", "HR@10"] == "0.400"
    assert (out["seeds"] == 1).all()


def test_a_figure_some_seed_lacks_is_not_averaged_over_the_others(tmp_path):
    views = {"embedding": 0.6, "upload": 0.55, "upload-direction": 0.58}
    write_run(tmp_path / "x" / "seed0", 0.2, 0.6, views)
    write_run(tmp_path / "x" / "seed1", 0.4, float("nan"), {"embedding": 0.7})  # read no client, no upload view
    row = table(tmp_path).set_index("setting").loc["x"]
    assert row["seeds"] == 2 and row["HR@10"] == "0.300 ± 0.141"
    assert row["precision"] == "-" and row["BA upload"] == "-"  # were 0.600 ± 0.000 and 0.550 ± 0.000
