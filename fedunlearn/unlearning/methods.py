"""The registered methods as functions, and the history policy that serves the configured ones."""

from __future__ import annotations

from pkgutil import resolve_name

from fedunlearn.config import UnlearnConfig
from fedunlearn.fl.history import HistoryPolicy
from fedunlearn.unlearning.context import Method
from fedunlearn.unlearning.registry import METHODS, HistoryNeeds


def load_methods() -> dict[str, Method]:
    """Every registered method, in registry order (the order of the comparison table)."""
    return {name: resolve_name(entry.function) for name, entry in METHODS.items()}


def history_policy(unlearn: UnlearnConfig) -> HistoryPolicy:
    """Only what the chosen method reads (participation and step sizes are always kept); `compare`
    tries every method, so it keeps what any of them reads."""
    needs = HistoryNeeds()
    for name in METHODS if unlearn.compare else [unlearn.method]:
        needs = needs.union(METHODS[name].history)
    return HistoryPolicy(
        checkpoint_every=unlearn.dt,
        checkpoints=needs.checkpoints,
        full_updates=needs.full_updates,
        compact=needs.compact,
        alpha=unlearn.alpha,
        dtype=unlearn.history_dtype,
    )
