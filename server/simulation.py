"""`fedunlearn run --engine flower`: the Flower ServerApp and ClientApp under Flower's simulation
engine, with Ray started lean on 127.0.0.1 (Flower skips its own ray.init when Ray is up)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from types import ModuleType

from clients.common import SIMULATION_ORACLE_ENV
from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.rounds import FederationResult
from server.pool import FlowerPool

LOOPBACK = "127.0.0.1"
# Ray turns a node address of 127.0.0.1 into the machine's outward address unless multi-node
# clustering is off; with it off every Ray process binds and connects on 127.0.0.1 only. Ray reads
# the switch once, when it is first imported.
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

RAY_START_TRIES = 3


def ray_on_loopback() -> ModuleType:
    """Ray, imported with clustering off where we import it first. The switch is set only for the
    import: processes started later (a `flwr run`'s own simulation) inherit nothing of it."""
    if "ray" not in sys.modules:
        before = os.environ.get(CLUSTER_SWITCH)
        os.environ[CLUSTER_SWITCH] = "0"
        try:
            import ray  # noqa: F401
        finally:
            if before is None:
                del os.environ[CLUSTER_SWITCH]
            else:
                os.environ[CLUSTER_SWITCH] = before
    return sys.modules["ray"]


def start_ray(num_cpus: int, address: str = "") -> None:
    """Start Ray on 127.0.0.1 with `num_cpus` CPUs, or with `address` join a running cluster (whose
    nodes bring their own CPUs and GPUs)."""
    ray = ray_on_loopback()

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default; silences its warning
    # the oracle marker reaches the clients only through fedunlearn's own simulation
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_python_path()), SIMULATION_ORACLE_ENV: "1"}}
    if address:
        _require_listener(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError) as error:
            raise FedUnlearnError(
                f"run.ray_address = {address!r}: no Ray cluster answers there ({str(error).splitlines()[0]}); "
                "start one with `ray start --head`, or leave run.ray_address empty to start Ray here"
            ) from None
        return
    for attempt in range(1, RAY_START_TRIES + 1):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                logging_level=logging.ERROR,
                log_to_driver=False,
                runtime_env=runtime_env,
            )
            break
        except Exception:  # Ray's start-up times out now and then on a loaded 2-core machine
            if attempt == RAY_START_TRIES:
                raise
            ray.shutdown()
            time.sleep(2)
    address = ray.util.get_node_ip_address()
    if address != LOOPBACK:  # Ray was imported before this module could keep it on loopback
        ray.shutdown()
        raise FedUnlearnError(
            f"Ray started on {address}, not {LOOPBACK}: Ray was imported before fedunlearn could keep it on "
            f"loopback; set {CLUSTER_SWITCH}=0 before importing ray"
        )


def _require_listener(address: str) -> None:
    """Fail at once where nothing listens: ray.init retries an absent cluster for minutes."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    raise FedUnlearnError(
        f"run.ray_address = {address!r}: no Ray cluster answers there ({reason}); start one with "
        "`ray start --head`, or leave run.ray_address empty to start Ray here"
    )


def _python_path() -> list[str]:
    import sys

    return [p for p in sys.path if p]


class _RunSimulationDeprecation(logging.Filter):
    """Flower 1.41+ deprecates `run_simulation` for the `flwr run` command and has no Python entry
    point in its place; `fedunlearn run --engine flower` is such a Python driver, so its banner tells
    our users nothing they can act on. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def quiet_flower_console() -> None:
    """No colour codes where the console is not a terminal (a log file), and no banner for the
    deprecation above; every other Flower message stays."""
    from flwr.common.logger import FLOWER_LOGGER, update_console_handler

    update_console_handler(colored=sys.stderr.isatty())
    if not any(isinstance(known, _RunSimulationDeprecation) for known in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_RunSimulationDeprecation())


def run_flower(
    config: Config,
    keep_replies: bool = False,
    history: HistoryStore | None = None,
    schedule: dict[int, list[str]] | None = None,
    show_progress: bool = True,
) -> tuple[FederationResult, FlowerPool]:
    """Run the federation through Flower's simulation engine; returns the result and the pool
    (whose `replies_seen` holds every client reply when `keep_replies` is asked for)."""
    ray = ray_on_loopback()
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    federation = cached_federation(config.data, config.run.seed)
    outcome: list[tuple[FederationResult, FlowerPool]] = []
    errors: list[BaseException] = []
    resources = {"num_cpus": config.run.client_cpus, "num_gpus": config.run.client_gpus}
    start_ray(config.run.num_cpus, config.run.ray_address)
    quiet_flower_console()
    stopping = threading.Event()
    try:
        run_simulation(
            server_app=make_server_app(
                config,
                lambda result, pool: outcome.append((result, pool)),
                keep_replies,
                history,
                schedule,
                show_progress,
                errors.append,
                stopping,
            ),
            client_app=client_app,
            num_supernodes=federation.n_clients,
            backend_config={"client_resources": resources},
        )
    except BaseException:  # Ctrl-C: the ServerApp's thread must not wait for replies that never come
        stopping.set()
        raise
    finally:
        ray.shutdown()
    if errors:  # the ServerApp's own error (a FedUnlearnError is one line for the user), raised here
        raise errors[0]
    if not outcome:
        raise RuntimeError("the Flower simulation ended without a result: see the log above")
    return outcome[0]
