"""Client unlearning methods behind one small interface: `method(server, round, forgotten) -> shared`.

`server` is the FederatedServer (its `active` list already excludes the forgotten clients); the
method returns the new shared parameters, running any calibration as real rounds through the
server's client pool, so it works on every engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedunlearn.models import Arrays
from fedunlearn.unlearning.accum import accum
from fedunlearn.unlearning.ascent import ascent
from fedunlearn.unlearning.federaser import federaser
from fedunlearn.unlearning.fru import fru
from fedunlearn.unlearning.retrain import retrain

if TYPE_CHECKING:
    from fedunlearn.rounds import FederatedServer

Method = Callable[["FederatedServer", int, list[int]], Arrays]


def none(server: FederatedServer, round_number: int, forgotten: list[int]) -> Arrays:
    """No unlearning: the leaving clients' influence stays in the model."""
    return server.shared


METHODS: dict[str, Method] = {
    "retrain": retrain,
    "federaser": federaser,
    "fru": fru,
    "accum": accum,
    "ascent": ascent,
    "none": none,
}
