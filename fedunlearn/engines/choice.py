"""Choosing an engine: `auto` picks the fastest one that follows the in-process numbers (within a
float-sum order: over many rounds the two drift apart by less than another training draw moves a
run, docs/ARCHITECTURE.md)."""

from __future__ import annotations

from fedunlearn.config import Config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.federation import Federation


def chaotic_under_reordering(config: Config) -> bool:
    """NCF trained with BPR and Adam: BPR cannot see a shift common to all of a user's scores (the
    output bias; the bias of a last-layer unit active for every item), so those gradients are zero
    up to float rounding, and Adam scales that rounding noise up to full-size steps. Any change in
    the order of float sums then sends training down another (equally good) path, so the batched
    engine cannot reproduce the in-process numbers there."""
    return config.model.name == "ncf" and config.model.loss == "bpr" and config.train.optimizer == "adam"


def choose_engine(config: Config) -> str:
    """`auto`: the fastest engine that follows the in-process numbers for this configuration
    (batched, within the tolerance in docs/ARCHITECTURE.md), else the in-process runner (also for
    trained pseudo-items, which the batched trainer does not train)."""
    if config.run.engine != "auto":
        return config.run.engine
    follows = not chaotic_under_reordering(config) and not config.defence.trains_fake_items()
    return "batched" if follows else "inprocess"


def make_pool(config: Config, federation: Federation) -> InProcessPool | BatchedPool:
    return BatchedPool(config, federation) if config.run.engine == "batched" else InProcessPool(config, federation)


