"""Every client unlearning method, by name: where its function lives and what it reads from the
update history. The one place a method is named; config, CLI, history and the server read it.

Kept free of the project's other modules (the configuration validates against it), so a method's
function is named here as `module:function` and imported by `fedunlearn.unlearning.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_UPDATES = ("none", "first", "every")  # how many checkpoints' full client updates, fewest first


@dataclass(frozen=True)
class HistoryNeeds:
    """What a method reads from the history, beyond participation and step sizes (always kept)."""

    checkpoints: bool = False  # the global parameters at checkpoint rounds
    full_updates: str = "none"  # participants' full updates at "every" checkpoint, the "first", or "none"
    compact: bool = False  # FRU's compact updates of every round

    def union(self, other: HistoryNeeds) -> HistoryNeeds:
        return HistoryNeeds(
            self.checkpoints or other.checkpoints,
            max(self.full_updates, other.full_updates, key=FULL_UPDATES.index),
            self.compact or other.compact,
        )


@dataclass(frozen=True)
class MethodEntry:
    function: str  # "module:function", a Method: (server, round, forgotten positions) -> shared
    history: HistoryNeeds


METHODS: dict[str, MethodEntry] = {
    "retrain": MethodEntry("fedunlearn.unlearning.retrain:retrain", HistoryNeeds()),
    "federaser": MethodEntry("fedunlearn.unlearning.federaser:federaser", HistoryNeeds(True, "first")),
    "fru": MethodEntry("fedunlearn.unlearning.fru:fru", HistoryNeeds(True, compact=True)),
    "accum": MethodEntry("fedunlearn.unlearning.accum:accum", HistoryNeeds(True, "every")),
    "ascent": MethodEntry("fedunlearn.unlearning.ascent:ascent", HistoryNeeds()),
    "none": MethodEntry("fedunlearn.unlearning.none:none", HistoryNeeds()),
}
