"""Flower ServerApp: discovery, then the shared round loop of fedunlearn.fl.rounds over a FlowerPool.

Under `flwr run .` the config comes from `[tool.flwr.app.config]` (a TOML file and `key=value`
overrides) and the results folder from `out`; `fedunlearn run --engine flower` builds the app with
its config and collects the result itself. After training, the privacy stage (audit, the defence
on the clients, audit again) runs whenever it does on the other engines (server.audit)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedunlearn.config import Config, load_config
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.rounds import FederationResult
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from server.pool import FlowerPool


def serve(
    grid: Grid,
    config: Config,
    progress: Progress,
    keep_replies: bool = False,
    history: HistoryStore | None = None,
    schedule: dict[int, list[str]] | None = None,
) -> tuple[FederationResult, FlowerPool]:
    federation = cached_federation(config.data, config.run.seed)
    pool = FlowerPool(grid, config, federation.n_clients, keep_replies)
    server = federated_server(config, federation, pool, progress, history, schedule)
    result = server.run()
    if config.audit.enabled:  # as on every engine: audit, defend on the clients, audit again
        from server.audit import audit_on_flower

        result.privacy = audit_on_flower(config, federation, server, pool, result)
    elif config.defence.method != "none":  # no audit asked: defend, and read no user part back
        from server.audit import defend_without_audit

        result.defence = defend_without_audit(config, server, pool, result)
    return result, pool


def make_server_app(
    config: Config,
    on_result: Callable[[FederationResult, FlowerPool], None],
    keep_replies: bool = False,
    history: HistoryStore | None = None,
    schedule: dict[int, list[str]] | None = None,
    show_progress: bool = True,
    on_error: Callable[[BaseException], None] | None = None,
    stopping: threading.Event | None = None,
) -> ServerApp:
    """The ServerApp of `fedunlearn run --engine flower`. Flower's simulation logs an exception the
    ServerApp raises and returns; `on_error` receives it, so the caller can raise it again. Once
    `stopping` is set (the simulation was interrupted), the app's next look for replies raises."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if stopping is not None:
            stop_when(grid, stopping)
        progress = Progress(config.train.rounds, show_progress)
        try:
            on_result(*serve(grid, config, progress, keep_replies, history, schedule))
        except Exception as error:
            if on_error is None:
                raise
            on_error(error)
        finally:
            progress.close()

    return app


class SimulationStopped(RuntimeError):
    """The simulation around the ServerApp was stopped (Ctrl-C): its replies will never come."""


def stop_when(grid: Grid, stopping: threading.Event) -> None:
    """Make the grid's two waiting calls raise once `stopping` is set. Flower's ServerApp thread is
    not a daemon: on Ctrl-C the simulation engine stops, and a ServerApp still waiting for replies
    (up to server.pool.QUERY_SECONDS) kept the process alive after its 'interrupted' message.
    Set on the instance, so the grid's own send_and_receive (SecAgg+) polls through it too."""
    for name in ("pull_messages", "get_node_ids"):
        call = getattr(grid, name)

        def checked(*args: Any, _call: Callable[..., Any] = call, **kwargs: Any) -> Any:
            if stopping.is_set():
                raise SimulationStopped("the Flower simulation was stopped")
            return _call(*args, **kwargs)

        setattr(grid, name, checked)


def split_overrides(text: str) -> list[str]:
    """The run-config's `overrides` ("key=value;key=value"): split at a ';' that starts another
    setting only, so a drop schedule's own ';' ("unlearn.drop=\"3@8;7,9@12\"") stays in its value."""
    return [item.strip() for item in re.split(r";(?=\s*\w+\.\w+\s*=)", text) if item.strip()]


def _config_from_run_config(context: Context) -> tuple[Config, str]:
    run_config = context.run_config
    overrides = split_overrides(str(run_config.get("overrides", "")))
    config_file = str(run_config.get("config-file", "")) or None
    config = load_config(config_file, overrides + ["run.engine=flower"])
    return config, str(run_config.get("out", "results/flwr-run"))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedunlearn.runs.results import staged, write_run
    from fedunlearn.runs.runner import federated_job, run_facts

    started = time.perf_counter()
    config, out = _config_from_run_config(context)
    federation = cached_federation(config.data, config.run.seed)
    progress = Progress(config.train.rounds)

    def train(config: Config, history: HistoryStore | None, schedule: dict[int, list[str]]) -> FederationResult:
        return serve(grid, config, progress, False, history, schedule)[0]

    with staged(out, resumable=False) as staging:  # nothing to resume from: the clients' state was theirs
        info: dict[str, Any] = run_facts(config, federation)  # final.json said "? clients, 0.0 s" (a user's walk)
        try:
            config, result = federated_job(config, federation, staging.folder, train, info)  # as `fedunlearn run`
        finally:
            progress.close()
        info["seconds"] = round(time.perf_counter() - started, 2)
        staging.final = write_run(staging.folder, config, result, info)
