"""The one place a job's round loop is put together, for the runner, the ServerApp, the benchmarks
and the tests: every registered unlearning method and the audit's upload reading are plugged in,
and the job runs under the thread count its pool asks for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedunlearn.config import Config
from fedunlearn.fl.checkpoint import Checkpoint
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.rounds import ClientPool, FederatedServer, ServerPlugins
from fedunlearn.privacy.upload_attack import upload_view
from fedunlearn.progress import Progress
from fedunlearn.unlearning.methods import load_methods


def server_plugins() -> ServerPlugins:
    """Every registered unlearning method, and the audit's upload-structure reading."""
    return ServerPlugins(load_methods(), upload_view)


def federated_server(
    config: Config,
    federation: Federation,
    pool: ClientPool,
    progress: Progress,
    history: HistoryStore | None = None,
    schedule: dict[int, list[str]] | None = None,
    checkpoint: Checkpoint | None = None,
) -> FederatedServer:
    return FederatedServer(config, federation, pool, progress, history, schedule, checkpoint, server_plugins())


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block under `count` torch threads and give the caller's count back after it (torch's
    setting is process-wide: a pool that changed it for good would slow whatever the caller does next)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
