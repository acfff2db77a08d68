"""Recommenders split into a private user part and a shared part."""

from fedunlearn.config import ModelConfig
from fedunlearn.models.base import Arrays, SplitModel, Tensors
from fedunlearn.models.mf import MF
from fedunlearn.models.ncf import NCF


def build_model(config: ModelConfig, n_items: int) -> SplitModel:
    if config.name == "mf":
        return MF(n_items, config.dim, config.init_std)
    return NCF(n_items, config.dim, config.init_std, config.mlp_layers)


__all__ = ["Arrays", "MF", "NCF", "SplitModel", "Tensors", "build_model"]
