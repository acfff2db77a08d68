"""Everything the project starts binds on 127.0.0.1 only (Ray's processes for the simulation), and a
Flower run stops on Ctrl-C, leaving no process behind."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import listening, loopback

from server.simulation import ray_on_loopback, start_ray

pytestmark = pytest.mark.flower

def test_the_simulations_ray_listens_on_loopback_only():
    ray = ray_on_loopback()  # imported with clustering off: kept on loopback

    if ray.is_initialized():
        ray.shutdown()
    before = listening()
    start_ray(1)
    try:
        started = listening() - before
        assert started, "Ray started no listening socket: the check saw nothing"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert all(loopback(address) for address in started), sorted(started)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ctrl_c_stops_a_flower_run_and_leaves_no_process(tmp_path):
    """On Ctrl-C Flower stops its simulation engine, but its ServerApp thread (not a daemon) went on
    waiting for replies that never came: the process printed 'interrupted' and hung (a review)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedunlearn.cli", "run", "--engine", "flower", "--out", str(out),
               "--set", "data.synthetic_users=20", "--set", "train.rounds=500"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = bytearray()

    def read() -> None:
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while b"round=3," not in seen:  # the ServerApp is sending rounds
        assert time.monotonic() < deadline and process.poll() is None, seen.decode(errors="replace")[-500:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    try:
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=10)
    assert f"fedunlearn: interrupted; continue with: fedunlearn run --resume {out}" in seen.decode(errors="replace")
    assert not _left_in_session(process.pid, within=15), "processes of the run left behind"  # Ray's included


def _left_in_session(session: int, within: float) -> list[str]:
    """The processes still in `session` once it empties or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        table = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,args="], capture_output=True, text=True).stdout
        left = [line for line in table.splitlines() if line.split()[0] == str(session) and "Z" not in line.split()[2]]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
