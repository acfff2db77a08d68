"""`run.ray_address` joins a running Ray cluster instead of starting Ray: a head node started here
on 127.0.0.1 as its own process group (stopped by its pid), listening on loopback only, and the run
gives the in-process engine's numbers.

One node, not two: Ray 2.55 keeps a node on 127.0.0.1 only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
and then refuses any second node ("Multi-node Ray clusters are not supported"); with it on, Ray
maps 127.0.0.1 to the machine's outward address and binds the GCS on every interface (seen here
with a second loopback address, 127.0.0.2: `*:<port>`). Neither fits the rule that everything we
start listens on 127.0.0.1 only (docs/DEPLOYMENT.md)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, listening, loopback, run_cli

from server.deploy import free_port
from server.simulation import ray_on_loopback, start_ray

pytestmark = pytest.mark.flower

SETTINGS = TINY + ["data.synthetic_users=6", "train.rounds=2", "eval.every=1"]


CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where a plain ray.init() looks for a cluster to join


def _ray_node(*args: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DISABLE_USAGE_STATS="1")  # loopback only
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", *args]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def _wait(condition, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        _wait(lambda: not _group_alive(node.pid), "the node's processes to end", 60)
    finally:
        if _group_alive(node.pid):
            os.killpg(node.pid, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_run_on_a_running_cluster_gives_the_inprocess_numbers_and_stays_on_loopback(tmp_path):
    ray = ray_on_loopback()  # imported with clustering off: kept on loopback

    port = free_port()
    address = f"127.0.0.1:{port}"
    before, current = listening(), CURRENT_CLUSTER.read_bytes() if CURRENT_CLUSTER.exists() else None
    # its own temp dir: `ray start` notes its address there, and a later plain ray.init() (Flower's,
    # under `flwr run`) would otherwise try to join this cluster after it is gone, for minutes
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = _ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}")
    try:
        _wait(lambda: _listening(port), "the head node")
        start_ray(1, address)
        assert [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]] == ["127.0.0.1"]
        ray.shutdown()
        joined = run_cli([*SETTINGS, f"run.ray_address={address}"], "flower", tmp_path / "cluster")
        opened = listening() - before
        assert opened and all(loopback(socket_address) for socket_address in opened), sorted(opened)
    finally:
        ray.shutdown()
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _group_alive(head.pid)
    assert (CURRENT_CLUSTER.read_bytes() if CURRENT_CLUSTER.exists() else None) == current  # nothing left behind
    local = run_cli(SETTINGS, "inprocess", tmp_path / "inprocess")
    first, second = (pd.read_csv(folder / "metrics.csv").drop(columns="seconds") for folder in (joined, local))
    pd.testing.assert_frame_equal(first, second)


def test_an_address_with_no_cluster_is_a_one_line_error(tmp_path, capsys):
    from fedunlearn.cli import main

    address = f"127.0.0.1:{free_port()}"
    args = [part for setting in [*SETTINGS, f"run.ray_address={address}"] for part in ("--set", setting)]
    assert main(["run", *args, "--engine", "flower", "--quiet", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"fedunlearn: error: run.ray_address = '{address}': no Ray cluster answers there")
    assert not (tmp_path / "r").exists()
