"""No unlearning: the leaving clients' influence stays in the model (the lower reference)."""

from __future__ import annotations

from fedunlearn.models.base import Arrays
from fedunlearn.unlearning.context import UnlearningServer


def none(server: UnlearningServer, round_number: int, forgotten: list[int]) -> Arrays:
    return server.shared
