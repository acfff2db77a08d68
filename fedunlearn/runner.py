"""Run one configured job (federated on an engine, central, or popularity) and time it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fedunlearn.config import Config
from fedunlearn.federation import build_federation
from fedunlearn.progress import Progress
from fedunlearn.rounds import FederationResult, run_federation


@dataclass
class RunOutcome:
    result: FederationResult
    info: dict[str, Any] = field(default_factory=dict)


def execute(config: Config, show_progress: bool = True) -> RunOutcome:
    started = time.perf_counter()
    federation = build_federation(config.data, config.run.seed)
    info: dict[str, Any] = {
        "dataset": config.data.dataset,
        "clients": federation.n_clients,
        "items": federation.n_items,
    }
    mode = config.run.mode
    if mode == "popularity":
        from fedunlearn.popularity import rank_by_popularity

        result = rank_by_popularity(config, federation)
    elif mode == "central":
        from fedunlearn.central import train_central

        progress = Progress(config.central.epochs, show_progress, label="epochs")
        try:
            result = train_central(config, federation, progress)
        finally:
            progress.close()
    elif config.run.engine == "flower":
        from server.simulation import run_flower

        result, _ = run_flower(config)
    else:
        from fedunlearn.engine import InProcessPool

        progress = Progress(config.train.rounds, show_progress)
        try:
            pool = InProcessPool(config, federation)
            result = run_federation(config, federation.client_ids, federation.n_items, pool, progress)
        finally:
            progress.close()
    info["seconds"] = round(time.perf_counter() - started, 2)
    return RunOutcome(result, info)
