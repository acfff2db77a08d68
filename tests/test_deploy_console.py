"""What `python -m server.deploy` shows while a deployed run goes on (server/deploy.py): the
ServerApp's progress bar and warnings relayed from `flwr run --stream` as they arrive, without
Flower's colour codes, and a run past `--timeout` stopped with a one-line error."""

import io
import signal
import sys
import time
from pathlib import Path

import pytest

from fedunlearn.errors import FedUnlearnError
from server.deploy import Deployment, Relay, alive, main, node_config

# lines as `flwr run --stream` relays them (taken from a 3-SuperNode run's flwr-run.log)
STREAM = [
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n",
    "rounds:   0%|          | 0/3 [00:14<?, ?round/s, round=1, training=0/3]\n",
    "rounds:  67%|██████▋   | 2/3 [01:45<00:28, 28.37s/round, round=3, evaluating=2/2, HR@10=0.5000]"
    "fedunlearn: warning: HR@10 0.5000 is no better than ranking by popularity (0.5000)\n",
    "rounds: 100%|██████████| 3/3 [01:46<00:00, 35.34s/round, round=3, evaluating=2/2, HR@10=0.5000]\n",
    "fedunlearn: warning: a warning that mentions rounds: in its text\n",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_each_bar_redraw_and_each_warning_on_a_line_of_its_own():
    out = io.StringIO()
    relay = Relay(out)
    for line in STREAM:
        relay(line)
    relay.close()
    assert out.getvalue().splitlines() == [
        "rounds:   0%|          | 0/3 [00:14<?, ?round/s, round=1, training=0/3]",
        "rounds:  67%|██████▋   | 2/3 [01:45<00:28, 28.37s/round, round=3, evaluating=2/2, HR@10=0.5000]",
        "fedunlearn: warning: HR@10 0.5000 is no better than ranking by popularity (0.5000)",
        "rounds: 100%|██████████| 3/3 [01:46<00:00, 35.34s/round, round=3, evaluating=2/2, HR@10=0.5000]",
        "fedunlearn: warning: a warning that mentions rounds: in its text",  # no bar drawn from it
    ]


def test_a_terminal_gets_the_bar_redrawn_in_place_and_warnings_below_it():
    out = Terminal()
    relay = Relay(out)
    for line in STREAM:
        relay(line)
    relay.close()
    text = out.getvalue()
    assert "\x1b[92m" not in text and "INFO" not in text
    assert text.startswith("\rrounds:   0%")
    assert "HR@10=0.5000]\x1b[K\nfedunlearn: warning: HR@10 0.5000 is no better" in text
    assert text.endswith("HR@10=0.5000]\x1b[K\nfedunlearn: warning: a warning that mentions rounds: in its text\n")


BAR_LINE = "rounds:   0%|          | 0/3 [00:01<?, ?round/s, round=1]\n"


def hanging_flwr(tmp_path, monkeypatch) -> Path:
    """A stand-in `flwr` that prints one bar line, notes its pid and hangs; where the pid is noted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    flwr = bin_dir / "flwr"
    noted = tmp_path / "flwr.pid"
    flwr.write_text(f"#!/bin/sh\necho $$ > {noted}\necho '{BAR_LINE.strip()}'\nexec sleep 60\n")
    flwr.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr("server.deploy.PROJECT", tmp_path / "bin")  # the app copy: any small folder
    return noted


def test_a_run_past_its_timeout_is_stopped_with_one_line_and_its_lines_were_shown(tmp_path, monkeypatch):
    """The line reaches the console at once and the log as it comes, and the timeout stops the
    process with a FedUnlearnError (a TimeoutExpired traceback before; the log was written only
    after a run that ended)."""
    noted = hanging_flwr(tmp_path, monkeypatch)
    shown: list[tuple[float, str]] = []
    started = time.monotonic()
    deployment = Deployment(tmp_path / "work", nodes=1)
    with pytest.raises(FedUnlearnError, match=r"went past --timeout 2 s and was stopped \(its output so far: .*flwr"):
        deployment.run([], tmp_path / "out", timeout=2, relay=lambda line: shown.append((time.monotonic(), line)))
    assert [line for _, line in shown] == [BAR_LINE]
    assert shown[0][0] - started < 2  # relayed while the run went on, not after it
    assert time.monotonic() - started < 10
    assert (tmp_path / "work" / "flwr-run.log").read_text() == BAR_LINE
    assert not alive(int(noted.read_text()))


def test_an_interrupted_run_stops_flwr_run_too(tmp_path, monkeypatch):
    """Ctrl-C, SIGTERM or SIGHUP (which main turns into KeyboardInterrupt) during the run left `flwr
    run --stream` running: it is no descendant of the processes stop() ends (a review, 2026-12-07)."""
    noted = hanging_flwr(tmp_path, monkeypatch)

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            Deployment(tmp_path / "work", nodes=1).run([], tmp_path / "out", timeout=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not alive(int(noted.read_text()))
    assert (tmp_path / "work" / "flwr-run.log").read_text() == BAR_LINE


def test_a_timeout_that_is_not_a_positive_number_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--nodes", "3", "--out", "x", "--timeout", "0"])
    assert stopped.value.code == 2
    assert "--timeout must be a positive number of seconds, not 0" in capsys.readouterr().err


def test_each_supernode_gets_its_partition_and_a_secret_of_its_own():
    """The seed of a deployed client's LDP noise and pseudo-items is its node's, never the server's."""
    first, second = node_config(2, 3), node_config(2, 3)
    assert first.startswith("partition-id=2 num-partitions=3 noise-secret=")
    secret = int(first.rsplit("=", 1)[1])
    assert 0 <= secret < 2**63 and first != second  # fresh for every node started
