"""The one place a job's round loop is put together, for the runner, the ServerApp, the benchmarks
and the tests: every registered unlearning method and the audit's upload reading are plugged in,
and the job runs under the thread count its pool asks for."""

from __future__ import annotations

import os
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
def reproducible_torch(threads: int) -> Iterator[None]:
    """Run a block under `threads` torch threads with deterministic kernels, and give the caller's
    settings back after it (both are process-wide). On the CPU with more than one thread, the
    backward of an indexed read (`table[rows]`, which every engine's training uses) sums the rows'
    gradients with atomic adds in whatever order the threads reach them: the same run on the same
    machine gave three different models in five tries (ML-100K MF, 15 rounds, 2 threads), and 60
    rounds turn that last-bit noise into HR@10 0.598 / 0.611 / 0.626 on one seed. The engines read
    rows with `index_select` (its backward, `index_add_`, is deterministic and as fast); this mode
    makes any indexed read left, here or in a later change, sum in sorted order (docs/RESULTS.md).
    Filling fresh buffers with NaN, which the mode does by default, is switched off: it only costs."""
    fills = torch.utils.deterministic
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill_before = fills.fill_uninitialized_memory
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.set_num_threads(min(threads, os.cpu_count() or 1))  # more threads than cores only contend (or fail)
    torch.use_deterministic_algorithms(True, warn_only=True)
    fills.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)
        fills.fill_uninitialized_memory = fill_before
