"""Matrix factorisation: score = p_u . q_i."""

from __future__ import annotations

import numpy as np
import torch

from fedunlearn.models.base import Arrays, ItemScorer, SplitModel, Tensors


class MF(SplitModel):
    row_keys = ("item_emb",)
    dot_product = True

    def init_user(self, rng: np.random.Generator) -> Arrays:
        return {"user_emb": self._normal(rng, self.dim)}

    def init_shared(self, rng: np.random.Generator) -> Arrays:
        return {"item_emb": self._normal(rng, self.n_items, self.dim)}

    def score(self, user: Tensors, items: Tensors, dense: Tensors) -> torch.Tensor:
        return (user["user_emb"] * items["item_emb"]).sum(dim=-1)

    def frozen_item_scorer(self, rows: Tensors, dense: Tensors) -> ItemScorer:
        """Every item's score in one product, then each user's items picked out (no (n, L, d) gather)."""
        table = rows["item_emb"]
        return lambda user, items: (user["user_emb"][:, 0, :] @ table.T).gather(1, items)
