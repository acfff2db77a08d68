"""Flower's deployment engine on this machine's loopback: a SuperLink and N SuperNodes over TLS with
SuperNode authentication, a config run through `flwr run` against them, every process stopped by pid.

    python -m server.deploy --nodes 3 --out results/deploy [--set KEY=VALUE ...] [--workdir DIR]
        [--timeout SECONDS]

What it does, in order (docs/DEPLOYMENT.md has the multi-machine recipe):
1. a CA and a server certificate for 127.0.0.1 (subjectAltName IP:127.0.0.1, DNS:localhost), and
   one P-384 key pair per SuperNode, all made here with `cryptography` (Flower's own dependency);
2. `flower-superlink` with TLS and `--enable-supernode-auth` on a free port of 127.0.0.1 (one HTTPS
   port serves the Fleet, Control and Runtime APIs in Flower 1.42);
3. each node's public key registered (`flwr supernode register`): an unregistered node is refused;
4. N `flower-supernode`s, node i given partition i and a secret of its own (`noise-secret`, the seed
   of its client's LDP noise, pseudo-items and pseudo-classes, which the server never learns) through
   `--node-config`;
5. `flwr run . <connection>` of the config (a copy of the project, as `flwr run` uploads it),
   which writes the usual results folder to `--out`;
6. every process started here (and its children) stopped by pid.
Each step says so on stderr, and the ServerApp's progress bar and warnings, which `flwr run --stream`
relays, are shown as they arrive (the whole stream is kept in the workdir's flwr-run.log).
The deployed clients are not fedunlearn's simulation: they refuse the audit oracle
(`query.audit_users`), so a config with `audit.enabled = true` is refused before anything starts.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients.common import NOISE_SECRET, SIMULATION_ORACLE_ENV
from fedunlearn.config import load_config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.federation import build_federation
from fedunlearn.runs.runner import preflight

CONNECTION = "fedunlearn-deploy"  # the SuperLink connection's name in this deployment's FLWR_HOME
PROJECT = Path(__file__).resolve().parents[1]
START_SECONDS = 120.0
WARNING, ERROR = "fedunlearn: warning:", "FedUnlearnError:"  # how the ServerApp's messages read in flwr's log
BAR = "rounds:"  # the ServerApp's progress bar (fedunlearn.progress), one line per redraw in flwr's stream
ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Flower's log colours


def say(text: str) -> None:
    print(f"server.deploy: {text}", file=sys.stderr, flush=True)


class Relay:
    """Shows what `flwr run --stream` relays of the ServerApp while the run goes on: its progress
    bar redrawn in place on a terminal (each redraw a line elsewhere) and its warnings on lines of
    their own."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.terminal, self.bar_shown = self.stream.isatty(), False

    def __call__(self, raw: str) -> None:
        line = ESCAPES.sub("", raw.rstrip("\n"))
        bar, warning = line.find(BAR), line.find(WARNING)
        if bar >= 0 and not 0 <= warning < bar:  # "rounds:" inside a warning's text is no bar
            self._bar(line[bar : warning if warning > bar else None].rstrip())
        if WARNING in line:
            self._end_bar()
            print(line[line.index(WARNING) :], file=self.stream, flush=True)

    def _bar(self, text: str) -> None:
        if self.terminal:
            self.stream.write(f"\r{text}\x1b[K")
            self.bar_shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_bar(self) -> None:
        if self.bar_shown:
            self.stream.write("\n")
            self.bar_shown = False

    def close(self) -> None:
        self._end_bar()


def _private(key: ec.EllipticCurvePrivateKey, form: serialization.PrivateFormat) -> bytes:
    encoding = serialization.Encoding.PEM
    return key.private_bytes(encoding, form, serialization.NoEncryption())


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for a SuperLink on 127.0.0.1, valid two days."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedunlearn loopback CA")])
    until = now + datetime.timedelta(days=2)
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until).add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_private(server_key, serialization.PrivateFormat.PKCS8))
    paths[2].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (the private key stays with the node; the
    public one is registered with the SuperLink)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(_private(key, serialization.PrivateFormat.OpenSSH))
    private.chmod(0o600)
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    public.write_bytes(key.public_key().public_bytes(*openssh))
    return private, public


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def node_config(index: int, nodes: int) -> str:
    """SuperNode `index`'s --node-config: its partition, and a fresh secret for its client's own
    defence draws (clients.common.NOISE_SECRET): drawn from the run seed, as in a simulation, the
    server could draw a client's LDP noise again and take it off its upload."""
    return f"partition-id={index} num-partitions={nodes} {NOISE_SECRET}={secrets.randbelow(2**63)}"


@dataclass
class Deployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, in `folder` (certificates, keys, logs, FLWR_HOME)."""

    folder: Path
    nodes: int
    port: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home = self.folder / "flwr-home"
        self.home.mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {key: value for key, value in os.environ.items() if key != SIMULATION_ORACLE_ENV}
        self.env |= {"FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "w") as log:  # the child writes to its own copy of the handle
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder,
                                       start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "flwr"), *args]
        try:
            return subprocess.run(command, env=self.env, cwd=self.folder, capture_output=True, text=True,
                                  timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise FedUnlearnError(f"flwr {args[0]} {args[1]} got no answer in {timeout:g} s: see "
                                  f"{self.folder / 'superlink.log'}") from None  # fmt: skip

    def start(self) -> None:
        """Certificates, the SuperLink (TLS, SuperNode authentication), the nodes' keys registered,
        the SuperNodes started; returns once the SuperLink listens."""
        self.ca, cert, key = make_certificates(self.folder)
        for stale in self.folder.glob("superlink.db*"):  # an earlier deployment's nodes would still be
            stale.unlink()  # "online" there for a minute, and the ServerApp would send them its messages
        self.port = free_port()
        say(f"certificates made; starting the SuperLink on 127.0.0.1:{self.port} (TLS, SuperNode authentication)")
        self._spawn("superlink", ["flower-superlink", "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert),
                                  "--ssl-keyfile", str(key), "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.folder / "superlink.db"), "--enable-supernode-auth",
                                  "--disable-runtime-dependency-installation"])  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        while not _listening(self.port):
            if self.processes[0].poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # a SuperLink that lost the port to another process answers nothing itself: it exits
        if self.processes[0].poll() is not None or not _listening(self.port):
            taken = "address already in use" in (self.folder / "superlink.log").read_text(errors="replace")
            cause = f"port {self.port} was taken by another process meanwhile: run again" if taken else "see"
            raise FedUnlearnError(f"the SuperLink did not start ({cause} {self.folder / 'superlink.log'})")
        connection = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                      f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca}"\n')  # fmt: skip
        (self.home / "config.toml").write_text(connection)
        for index in range(self.nodes):
            private, public = make_node_key(self.folder, f"node{index}")
            self.register(public)
            self.start_node(index, private)
        say(f"{self.nodes} SuperNodes registered and started; logs in {self.folder}")

    def register(self, public: Path) -> None:
        done = self._flwr("supernode", "register", str(public), CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise FedUnlearnError(f"registering {public.name} failed: {(done.stdout + done.stderr).strip()[-300:]}")

    def start_node(self, index: int, private: Path | None, name: str = "") -> subprocess.Popen:
        """SuperNode `index` (partition `index`), authenticated with `private` (None: no key)."""
        command = ["flower-supernode", "--root-certificates", str(self.ca), "--superlink", f"127.0.0.1:{self.port}",
                   "--host", "127.0.0.1", "--port", str(free_port()),
                   "--node-config", node_config(index, self.nodes),
                   "--max-retries", "3"]  # fmt: skip
        if private is not None:
            command += ["--auth-supernode-private-key", str(private)]
        return self._spawn(name or f"supernode{index}", command)

    def run(self, overrides: list[str], out: Path, timeout: float | None,
            relay: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """`flwr run` of the config (`section.key=value` overrides) against this federation, from a
        copy of the project; the ServerApp writes the results folder to `out`. Each line of the
        stream goes to `relay` as it arrives; past `timeout` seconds the run is refused in one line
        (the caller's stop() ends the ServerApp with the rest)."""
        app = self.folder / "app"
        shutil.rmtree(app, ignore_errors=True)  # a copy left by an earlier run would run that run's code
        shutil.copytree(PROJECT, app, ignore=shutil.ignore_patterns(".*", "results", "__pycache__", "*.egg-info"))
        settings = ";".join(overrides)
        command = [str(Path(sys.executable).parent / "flwr"), "run", ".", CONNECTION, "--run-config",
                   f"overrides='{settings}' out='{out.resolve()}'", "--stream"]  # fmt: skip
        process = subprocess.Popen(command, env=self.env, cwd=app, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace")  # fmt: skip
        lines: list[str] = []
        log = self.folder / "flwr-run.log"

        def read() -> None:  # the log is written as the lines come: a stopped run keeps what it said
            shown = relay
            assert process.stdout is not None
            with open(log, "w") as kept:
                for line in process.stdout:
                    lines.append(line)
                    kept.write(line)
                    kept.flush()
                    if shown is not None:
                        try:
                            shown(line)
                        except Exception:  # a console that fails must not stop the pipe being drained
                            shown = None

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FedUnlearnError(f"flwr run went past --timeout {timeout:g} s and was stopped (its output so far: "
                                  f"{log}); give a longer --timeout, or none") from None  # fmt: skip
        finally:  # on a timeout, Ctrl-C or SIGTERM too: flwr run is no descendant of what stop() ends
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(5.0)
        return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")

    def stop(self) -> list[int]:
        """Stop every process started here and every descendant (the SuperLink starts its SuperExec
        in a session of its own) by pid; returns those still alive afterwards (none, normally)."""
        pids = descendants({process.pid for process in self.processes})
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                for process in self.processes:
                    process.poll()  # reap our own children
                time.sleep(0.2)
        return [pid for pid in pids if alive(pid)]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # state, ppid, ...


def descendants(roots: set[int]) -> set[int]:
    """These processes and all their descendants (Linux /proc): children by parent pid, and Flower's
    own subprocesses (SuperExec, ServerApp, ClientApp), which name their parent in `--parent-pid`
    and stay after it dies, re-parented to init (a crashed SuperLink's ServerApp outlived it)."""
    parents: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = {int(fields[1]), *_flagged_parent(entry)}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, linked in parents.items() if linked & frontier} - found
        found |= frontier
    return found


def _flagged_parent(entry: Path) -> set[int]:
    try:
        args = (entry / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return set()
    flag = args.index(b"--parent-pid") if b"--parent-pid" in args else -1
    return {int(args[flag + 1])} if 0 <= flag < len(args) - 1 and args[flag + 1].isdigit() else set()


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def deploy(overrides: list[str], nodes: int, out: Path, folder: Path, timeout: float | None = None,
           relay: Relay | None = None) -> dict:  # fmt: skip
    """Run the config on a loopback deployment of `nodes` SuperNodes; the final record. `relay`
    (default: one on stderr) shows each line `flwr run` streams, as it arrives."""
    if any("'" in item for item in overrides):
        raise FedUnlearnError("--set values travel inside single quotes in flwr run's run-config: write strings "
                              "with double quotes, e.g. --set 'unlearn.drop=\"3@8\"'")  # fmt: skip
    config = load_config(None, [*overrides, "run.engine=flower"])  # as the ServerApp reads it
    if config.audit.enabled:
        raise FedUnlearnError("a deployment runs no audit: its clients refuse the simulation's oracle "
                              "(query.audit_users); leave audit.enabled off, or audit in simulation "
                              "(fedunlearn run --engine flower)")  # fmt: skip
    federation = build_federation(config.data, config.run.seed)
    clients = federation.n_clients
    if clients != nodes:
        raise FedUnlearnError(f"the data has {clients} clients but --nodes is {nodes}: one SuperNode serves one client")
    preflight(config, federation)  # the drop schedule, the memory: said before any process starts
    for taken in (out, out.with_name(out.name + ".partial")):
        if taken.exists():
            raise FedUnlearnError(f"{taken} exists: choose another --out (a deployed run cannot be resumed: its "
                                  "clients' state lived on the SuperNodes)")  # fmt: skip
    deployment = Deployment(folder, nodes)
    relay = relay or Relay()
    try:
        deployment.start()
        say("flwr run: the ServerApp starts on the SuperLink; each message starts a ClientApp process on its node")
        done = deployment.run(overrides, out, timeout, relay)
    finally:
        relay.close()  # the bar's line ends before the next status line
        left = deployment.stop()
        say("every process it started is stopped" if not left else f"processes {left} did not stop")
    log = done.stdout  # flwr run's stderr went into the same pipe
    if left:
        raise FedUnlearnError(f"processes {left} did not stop: kill them by pid")
    if done.returncode != 0 or not (out / "final.json").is_file():
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # nothing to resume here
        raise FedUnlearnError(f"flwr run ended without results (exit {done.returncode}): {_cause(log)}; the whole "
                              f"log: {folder / 'flwr-run.log'}")  # fmt: skip
    return json.loads((out / "final.json").read_text())


def _cause(log: str) -> str:
    """The ServerApp's own one-line error where there is one, else the log's last line."""
    for line in reversed(log.splitlines()):
        if ERROR in line:
            return line[line.index(ERROR) + len(ERROR) :].strip()
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--nodes", type=int, required=True, help="SuperNodes, one per client of the data")
    parser.add_argument("--out", required=True, help="results folder to create")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", help="certificates, keys, logs (default: a new folder beside --out)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the run past this (default: none)")
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    out = Path(args.out)
    folder = Path(args.workdir) if args.workdir else out.with_name(out.name + ".deployment")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: unwind, so deploy() stops what it started
        signal.signal(signum, _interrupt)
    try:
        started = time.perf_counter()
        final = deploy(args.overrides, args.nodes, out, folder, args.timeout)
    except FedUnlearnError as error:
        print(f"server.deploy: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"server.deploy: interrupted; every process it started is stopped, logs in {folder}", file=sys.stderr)
        return 130
    print(f"HR@10 {final['metrics']['HR@10']:.4f} on {args.nodes} SuperNodes over TLS "
          f"({time.perf_counter() - started:.0f} s); results: {out}; logs and keys: {folder}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
