"""NeuMF (He et al. 2017): a GMF branch and an MLP branch joined by one output layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedunlearn.models.base import Arrays, ItemScorer, SplitModel, Tensors


class NCF(SplitModel):
    row_keys = ("item_gmf", "item_mlp")

    def __init__(self, n_items: int, dim: int, init_std: float, mlp_layers: list[int]) -> None:
        super().__init__(n_items, dim, init_std)
        self.mlp_layers = list(mlp_layers)

    @classmethod
    def from_settings(cls, settings: Any, n_items: int) -> NCF:
        return cls(n_items, settings.dim, settings.init_std, settings.mlp_layers)

    @classmethod
    def settings_of(cls, shared: Arrays) -> dict[str, Any]:
        layers = sum(key.startswith("mlp") and key.endswith(".bias") for key in shared)
        return super().settings_of(shared) | {"mlp_layers": [shared[f"mlp{i}.bias"].shape[0] for i in range(layers)]}

    def init_user(self, rng: np.random.Generator) -> Arrays:
        return {"user_gmf": self._normal(rng, self.dim), "user_mlp": self._normal(rng, self.dim)}

    def init_shared(self, rng: np.random.Generator) -> Arrays:
        shared = {
            "item_gmf": self._normal(rng, self.n_items, self.dim),
            "item_mlp": self._normal(rng, self.n_items, self.dim),
        }
        width = 2 * self.dim
        for layer, out in enumerate(self.mlp_layers):
            shared[f"mlp{layer}.weight"] = _glorot(rng, out, width)
            shared[f"mlp{layer}.bias"] = np.zeros(out, dtype=np.float32)
            width = out
        shared["out.weight"] = _glorot(rng, 1, self.dim + width)
        shared["out.bias"] = np.zeros(1, dtype=np.float32)
        return shared

    def score(self, user: Tensors, items: Tensors, dense: Tensors) -> torch.Tensor:
        """Also batched over clients: user (C, 1, d), items (C, L, d), each dense array (C, ...)."""
        gmf = user["user_gmf"] * items["item_gmf"]
        hidden = torch.cat([user["user_mlp"].expand_as(items["item_mlp"]), items["item_mlp"]], dim=-1)
        for layer in range(len(self.mlp_layers)):
            hidden = torch.relu(_linear(hidden, dense[f"mlp{layer}.weight"], dense[f"mlp{layer}.bias"]))
        joined = torch.cat([gmf, hidden], dim=-1)
        return _linear(joined, dense["out.weight"], dense["out.bias"]).squeeze(-1)

    def frozen_item_scorer(self, rows: Tensors, dense: Tensors) -> ItemScorer:
        """The item side of the first MLP layer and of the GMF branch's output weights computed once:
        W1 [u; v] = W1_u u + W1_v v, and w_gmf . (u * v) = u . (w_gmf * v) for every item at once."""
        first, out = dense["mlp0.weight"], dense["out.weight"][0]
        user_first, item_first = first[:, : self.dim], first[:, self.dim :]
        items_mlp = rows["item_mlp"] @ item_first.T + dense["mlp0.bias"]  # (items, h1)
        items_gmf = rows["item_gmf"] * out[: self.dim]  # (items, d)

        def score(user: Tensors, items: torch.Tensor) -> torch.Tensor:
            gmf = (user["user_gmf"][:, 0, :] @ items_gmf.T).gather(1, items)
            hidden = torch.relu(user["user_mlp"] @ user_first.T + items_mlp[items])
            for layer in range(1, len(self.mlp_layers)):
                hidden = torch.relu(_linear(hidden, dense[f"mlp{layer}.weight"], dense[f"mlp{layer}.bias"]))
            return gmf + hidden @ out[self.dim :] + dense["out.bias"]

        return score


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """inputs @ weight^T + bias; with a leading client dimension on all three (the batched engine's
    per-client copies of the layers), each client's rows meet its own layer."""
    return inputs @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def _glorot(rng: np.random.Generator, fan_out: int, fan_in: int) -> np.ndarray:
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32)
