"""Recommenders split into a private user part and a shared part.

`MODELS` is the one place a model is named (`model.name`): the configuration validates against
it and `build_model` imports the class it names. This module stays free of torch, so reading the
configuration does not load it; the model types live in `fedunlearn.models.base`.
"""

from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedunlearn.models.base import Arrays, SplitModel

MODELS: dict[str, str] = {
    "mf": "fedunlearn.models.mf:MF",
    "ncf": "fedunlearn.models.ncf:NCF",
}


class ModelSettings(Protocol):
    """What a model is built from (`config.ModelConfig` has it)."""

    name: str
    dim: int
    init_std: float
    mlp_layers: list[int]


def model_class(name: str) -> type[SplitModel]:
    return pkgutil.resolve_name(MODELS[name])


def build_model(settings: ModelSettings, n_items: int) -> SplitModel:
    return model_class(settings.name).from_settings(settings, n_items)


def settings_of(name: str, shared: Arrays) -> dict[str, Any]:
    """The `model.*` settings that built these shared parameters, read off their shapes."""
    return {"name": name, **model_class(name).settings_of(shared)}
