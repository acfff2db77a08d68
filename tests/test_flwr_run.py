"""`flwr run .`: Flower's own CLI runs the same ServerApp and ClientApp (through a SuperLink it starts
in the background) and writes the results folder `fedunlearn run` writes, with the same numbers.

Slow (about a minute): it copies the project to a temporary folder (flwr run rewrites
pyproject.toml and uploads the app), runs 8 SuperNodes with a drop, an audit and an on-client
defence, and stops the SuperLink it started. Its clients run in Flower's simulation runtime, not
fedunlearn's, so they answer the audit oracle only because the test sets FEDUNLEARN_SIMULATION_ORACLE
for them, as a user of a local `flwr run` simulation would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, run_cli

from clients.common import SIMULATION_ORACLE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.flower]

SETTINGS = TINY + ["data.synthetic_users=8", "train.rounds=3", "eval.every=3", "unlearn.drop=3@2",
                   "defence.method=d2d-r", "defence.steps=3", "defence.clients=at-risk",
                   "audit.enabled=true", 'audit.attributes=["gender","age"]']  # fmt: skip
PROJECT = Path(__file__).resolve().parents[1]


def _flwr_run(tmp_path: Path, out: Path) -> subprocess.CompletedProcess:
    app = tmp_path / "app"
    shutil.copytree(PROJECT, app, ignore=shutil.ignore_patterns(".*", "results", "__pycache__", "*.egg-info"))
    env = {"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           SIMULATION_ORACLE_ENV: "1"}  # fmt: skip  # flwr's local simulation: the operator lets the audit read
    flwr = str(Path(sys.executable).parent / "flwr")
    overrides = ";".join(SETTINGS)
    command = [flwr, "run", ".", "--federation-config", "num-supernodes=8",
               "--run-config", f"overrides='{overrides}' out='{out}'", "--stream"]  # fmt: skip
    before = _superlinks()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # flwr starts flower-superlink
    try:
        return subprocess.run(command, cwd=app, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    finally:
        for pid in _superlinks() - before:  # the SuperLink flwr run left in the background
            subprocess.run(["kill", str(pid)], check=False)


def _superlinks() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def test_flwr_run_writes_the_results_of_fedunlearn_run(tmp_path):
    flwr_out = tmp_path / "flwr-out"
    run = _flwr_run(tmp_path, flwr_out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ours = run_cli(SETTINGS, "flower", tmp_path / "ours")
    assert sorted(p.name for p in flwr_out.iterdir()) == sorted(p.name for p in ours.iterdir())
    theirs_final, ours_final = (json.loads((folder / "final.json").read_text()) for folder in (flwr_out, ours))
    assert set(theirs_final) == set(ours_final)  # the data's facts and seconds too (they were left out)
    assert theirs_final["metrics"]["HR@10"] == ours_final["metrics"]["HR@10"]
    assert theirs_final["defending_clients"] == ours_final["defending_clients"]
    pd.testing.assert_frame_equal(pd.read_csv(flwr_out / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(ours / "metrics.csv").drop(columns="seconds"))  # fmt: skip
    audits = [pd.read_csv(folder / "audit.csv").drop(columns="seconds") for folder in (flwr_out, ours)]
    pd.testing.assert_frame_equal(*audits, atol=1e-4)  # SecAgg+ rounding in the defence's sums
