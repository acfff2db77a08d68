"""Verification of unlearning against Retrain: speedup and distance of each method's model."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedunlearn.config import Config
from fedunlearn.models import Arrays, build_model
from fedunlearn.seeding import Stream, rng_for


def compare_with_retrain(rows: list[dict[str, Any]], unlearned: list[Arrays]) -> None:
    """Speedup (client-epochs and wall time) and parameter distance of every unlearning run to the
    Retrain run of the same model and seed, measured on the shared parameters right after unlearning;
    the cosine is between the changes from the common initial parameters."""
    retrains = {(r["model"], r["seed"]): i for i, r in enumerate(rows) if r.get("method") == "retrain"}
    for row, params in zip(rows, unlearned, strict=True):
        reference = retrains.get((row["model"], row["seed"])) if "method" in row else None
        if reference is None:
            continue
        ref_row, ref_params = rows[reference], unlearned[reference]
        row["speedup"] = _ratio(ref_row["client_epochs"], row["client_epochs"])
        row["speedup_time"] = _ratio(ref_row["unlearn_seconds"], row["unlearn_seconds"])
        initial = _initial(row, params)
        flat, ref_flat, start = (
            np.concatenate([a[k].ravel() for k in sorted(a)]) for a in (params, ref_params, initial)
        )
        row["L2_to_retrain"] = float(np.linalg.norm(flat - ref_flat))
        moved, ref_moved = flat - start, ref_flat - start
        row["cosine_to_retrain"] = float(moved @ ref_moved / (np.linalg.norm(moved) * np.linalg.norm(ref_moved)))


def _initial(row: dict[str, Any], params: Arrays) -> Arrays:
    config = Config()
    config.model.name = row["model"]
    config.model.dim = params["item_emb" if row["model"] == "mf" else "item_gmf"].shape[1]
    if row["model"] == "ncf":
        config.model.mlp_layers = [
            params[f"mlp{i}.bias"].shape[0] for i in range(sum(k.endswith(".bias") for k in params) - 1)
        ]
    n_items = params["item_emb" if row["model"] == "mf" else "item_gmf"].shape[0]
    return build_model(config.model, n_items).init_shared(rng_for(row["seed"], Stream.SHARED_INIT))


def _ratio(reference: float, value: float) -> float:
    return reference / value if value > 0 else float("inf")
