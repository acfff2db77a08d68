"""The split every model follows: a private user part and a shared part (item rows + dense layers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Arrays = dict[str, np.ndarray]
Tensors = dict[str, torch.Tensor]
ItemScorer = Callable[[Tensors, torch.Tensor], torch.Tensor]  # (users' tables, (n, L) item ids) -> (n, L) scores


class SplitModel(ABC):
    """A recommender whose parameters are split between the client and the server.

    `user` parameters never leave the client. `shared` parameters are owned by the server: the
    tables named in `row_keys` are indexed by item (a client only touches the rows of the items it
    trains on and uploads those rows sparsely); every other shared array is dense.
    """

    row_keys: tuple[str, ...]
    dot_product = False  # the score is user_emb . item_emb and nothing else (the batched engine's shortcut)

    def __init__(self, n_items: int, dim: int, init_std: float) -> None:
        self.n_items = n_items
        self.dim = dim
        self.init_std = init_std

    @classmethod
    def from_settings(cls, settings: Any, n_items: int) -> SplitModel:
        """Built from `model.*` (a `fedunlearn.models.ModelSettings`)."""
        return cls(n_items, settings.dim, settings.init_std)

    @classmethod
    def settings_of(cls, shared: Arrays) -> dict[str, Any]:
        """The `model.*` settings these shared parameters were built with, read off their shapes."""
        return {"dim": shared[cls.row_keys[0]].shape[1]}

    @abstractmethod
    def init_user(self, rng: np.random.Generator) -> Arrays:
        """A fresh user part (one vector per user-side table)."""

    @abstractmethod
    def init_shared(self, rng: np.random.Generator) -> Arrays:
        """A fresh shared part."""

    @abstractmethod
    def score(self, user: Tensors, items: Tensors, dense: Tensors) -> torch.Tensor:
        """Scores of B (user, item) pairs: `user` and `items` hold (B, .) rows, `dense` the layers."""

    def frozen_item_scorer(self, rows: Tensors, dense: Tensors) -> ItemScorer:
        """score(user, items) for many users at once with the item side fixed (AttrCloak-DD's retention
        loss): user (n, 1, d) per table, items (n, L) ids -> (n, L). A model may precompute its item side."""
        return lambda user, items: self.score(user, {key: table[items] for key, table in rows.items()}, dense)

    def dense_keys(self, shared: Arrays) -> list[str]:
        return [key for key in shared if key not in self.row_keys]

    def _normal(self, rng: np.random.Generator, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * self.init_std).astype(np.float32)
