"""Flower's deployment engine on loopback (server/deploy.py): a SuperLink and 3 SuperNodes over TLS
with SuperNode authentication run 3 rounds, a drop erased with FedEraser and an on-client defence
through `flwr run`, to the in-process engine's metrics (which the Flower simulation equals,
tests/test_engines.py); an unregistered node is refused; the deployed clients refuse the audit
oracle; nothing is left running. Slow: each message starts a ClientApp process on each node."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_cli

from server.deploy import Deployment, alive, descendants, make_node_key

pytestmark = [pytest.mark.slow, pytest.mark.flower]

SETTINGS = ["data.synthetic_users=3", "data.synthetic_items=1000", "data.synthetic_interactions=40",
            "data.test_negatives=19", "model.dim=8", "train.rounds=3", "eval.every=3", "unlearn.drop=2@3",
            "unlearn.method=federaser", "defence.method=d2d-r", "defence.steps=1"]  # fmt: skip


def _refused(process, log: Path) -> bool:
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    said = log.read_text()
    return process.returncode not in (None, 0) and "Exit Code: 305" in said and "SuperNode" in said


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    deployed = Deployment(folder, nodes=3)
    outcome = {"folder": folder}
    try:
        deployed.start()
        outcome["roots"] = {process.pid for process in deployed.processes}
        outcome["run"] = deployed.run(SETTINGS, folder / "out", timeout=900)
        stranger, _ = make_node_key(folder, "stranger")  # a key the SuperLink was never told about
        outcome["stranger"] = _refused(deployed.start_node(0, stranger, "stranger"), folder / "stranger.log")
        outcome["keyless"] = _refused(deployed.start_node(1, None, "keyless"), folder / "keyless.log")
        audited = [*SETTINGS[:-2], "audit.enabled=true"]
        outcome["audited"] = deployed.run(audited, folder / "audited", timeout=900)
    finally:
        outcome["tree"] = descendants({process.pid for process in deployed.processes})
        outcome["left"] = deployed.stop()
    return outcome


def test_a_tls_deployment_with_authenticated_nodes_gives_the_in_process_metrics(deployment, tmp_path):
    run, out = deployment["run"], deployment["folder"] / "out"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ours = run_cli(SETTINGS, "inprocess", tmp_path / "ours")
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(ours / "metrics.csv").drop(columns="seconds"))  # fmt: skip
    theirs_final, ours_final = (json.loads((folder / "final.json").read_text()) for folder in (out, ours))
    assert [e["after"] for e in theirs_final["events"]] == [e["after"] for e in ours_final["events"]]
    assert theirs_final["events"][0]["MIA_AUC"] == ours_final["events"][0]["MIA_AUC"]
    assert theirs_final["events"][0]["method"] == "federaser" and theirs_final["events"][0]["clients"] == ["2"]
    assert theirs_final["defence"]["defending_clients"] == 2  # the defence ran on the clients left
    facts = ("dataset", "clients", "items")  # final.json said "? clients, ? items, 0.0 s" (a user's walk)
    assert [theirs_final[key] for key in facts] == [ours_final[key] for key in facts] and theirs_final["seconds"] > 0


def test_a_node_the_superlink_does_not_know_is_refused(deployment):
    assert deployment["stranger"], "a SuperNode with an unregistered key joined"
    assert deployment["keyless"], "a SuperNode without a key joined"


def test_deployed_clients_refuse_the_audit_oracle(deployment):
    audited = deployment["audited"]
    assert not (deployment["folder"] / "audited" / "final.json").exists()  # flwr run itself exits 0 regardless
    assert "query.audit_users is the simulation's measurement oracle" in audited.stdout + audited.stderr


def test_nothing_is_left_running(deployment):
    assert deployment["left"] == []
    assert deployment["roots"] < deployment["tree"]  # the SuperLink's and SuperNodes' own children counted
    assert not [pid for pid in deployment["tree"] if alive(pid)]


def test_a_deployment_again_in_the_same_folder_right_after_one_finished(tmp_path):
    """The SuperLink's database in the work folder outlived the run: its nodes stayed "online" there
    for a minute, the next run's ServerApp sent them its messages, and it failed with "Node
    Unavailable" on every rerun within that minute (a user's walk)."""
    from server.deploy import deploy

    settings = [*SETTINGS[:5], "train.rounds=1", "eval.every=1"]
    folder = tmp_path / "work"
    first = deploy(settings, 3, tmp_path / "first", folder)
    second = deploy(settings, 3, tmp_path / "second", folder)
    assert second["metrics"]["HR@10"] == first["metrics"]["HR@10"]
    assert not (tmp_path / "second.partial").exists()
