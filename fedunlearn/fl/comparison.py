"""Each unlearning run against its Retrain run (the same model, seed, event and everything but the
method: `reference_key`): speedups and the distance of the unlearned shared parameters to Retrain's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from fedunlearn.config import Config, derive
from fedunlearn.models import build_model, model_class, settings_of
from fedunlearn.models.base import Arrays
from fedunlearn.seeding import Stream, rng_for


def compare_with_retrain(
    rows: list[dict[str, Any]], unlearned: list[Arrays | None], starts: dict[str, Arrays] | None = None
) -> None:
    """Speedup (client-epochs, optimizer steps and wall time) and parameter distance of every unlearning run to the
    Retrain run of the same model, seed and event, measured on the shared parameters right after
    unlearning (where they were kept: None skips the distance); the cosine is between each model's
    change from the initial parameters it grew from, as its row's `initial` says they were drawn (a
    Retrain under secure aggregation draws its own: unlearning/retrain.py). `starts`: parameters
    already at hand, by that key."""
    def shapes(arrays: Arrays) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((key, arrays[key].shape) for key in sorted(arrays))

    known = {(drawn, shapes(arrays)): arrays for drawn, arrays in (starts or {}).items()}  # one draw, any model

    def start(row: dict[str, Any], params: Arrays) -> Arrays:
        drawn = _text(row.get("initial"))
        if drawn is None:
            return _initial(row, params)
        key = (drawn, shapes(params))
        if key not in known:
            known[key] = _initial(row, params)
        return known[key]

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["model"], row["seed"], row.get("event"), _text(row.get("retrain_key"))

    retrains = {key(r): i for i, r in enumerate(rows) if r.get("method") == "retrain"}
    for row, params in zip(rows, unlearned, strict=True):
        reference = retrains.get(key(row)) if "method" in row else None
        if reference is None:
            continue
        ref_row, ref_params = rows[reference], unlearned[reference]
        row["speedup"] = _ratio(ref_row["client_epochs"], row["client_epochs"], 0.0)
        row["speedup_steps"] = _ratio(ref_row["optimizer_steps"], row["optimizer_steps"], 0.0)
        row["speedup_time"] = _ratio(ref_row["unlearn_seconds"], row["unlearn_seconds"], MEASURABLE_SECONDS)
        if params is None or ref_params is None:
            continue
        begin, ref_begin = start(row, params), start(ref_row, ref_params)
        flat, ref_flat, origin, ref_origin = (
            np.concatenate([a[k].ravel() for k in sorted(a)]) for a in (params, ref_params, begin, ref_begin)
        )
        row["L2_to_retrain"] = float(np.linalg.norm(flat - ref_flat))
        moved, ref_moved = flat - origin, ref_flat - ref_origin
        row["cosine_to_retrain"] = float(moved @ ref_moved / (np.linalg.norm(moved) * np.linalg.norm(ref_moved)))


def reference_key(config: Config) -> str:
    """What a Retrain run shares with the unlearning runs it is the reference of: the data, model,
    training and evaluation settings, the faults and the upload defences with the clients that apply
    them (both change training),
    both seeds, the drop schedule and the engine that ran (the batched and the in-process engine sum
    floats in another order, and long training takes the two down paths as far apart as two seeds:
    docs/ARCHITECTURE.md), not the method or its own settings (an experiment may hold several
    Retrains, e.g. with other training draws)."""
    unlearn, run = config.unlearn, config.run
    sections = ("data", "model", "train", "eval", "faults")
    parts: dict[str, Any] = {section: asdict(getattr(config, section)) for section in sections}
    parts["uploads"] = {k: v for k, v in asdict(config.defence).items() if k.startswith(UPLOAD_DEFENCE_FIELDS)}
    if config.defence.upload != "none":  # and who applies it (fl.client.defends_upload)
        parts["uploads"] |= {"clients": config.defence.clients, "client_ids": sorted(config.defence.client_ids)}
    parts |= {"seed": run.seed, "train_seed": run.training_seed(), "drop": unlearn.drop, "random": unlearn.drop_random}
    parts["engine"] = run.engine  # give the config a run recorded: `auto` resolved
    parts |= {"poison": unlearn.poison, "boost": unlearn.poison_boost, "target": unlearn.target_item}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


UPLOAD_DEFENCE_FIELDS = ("upload", "secagg_", "ldp_", "pseudo_")  # the [defence] settings applied while training


def initial_key(config: Config) -> str:
    """How the run's initial shared parameters were drawn: its training seed and model.init_std."""
    return f"{config.run.training_seed()}:{config.model.init_std!r}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None  # a row from before the key (or a CSV's NaN): none


def _initial(row: dict[str, Any], params: Arrays) -> Arrays:
    seed, init_std = row["seed"], None
    if _text(row.get("initial")):
        seed_text, std_text = str(row["initial"]).split(":")
        seed, init_std = int(seed_text), float(std_text)
    settings = {f"model.{key}": value for key, value in settings_of(row["model"], params).items()}
    config = derive(Config(), settings | ({} if init_std is None else {"model.init_std": init_std}))
    n_items = params[model_class(row["model"]).row_keys[0]].shape[0]
    return build_model(config.model, n_items).init_shared(rng_for(seed, Stream.SHARED_INIT))


TARGETS_AGAINST_RETRAIN = {"HR@10": 0.02, "ER@10": 0.02, "MIA_AUC": 0.03}  # issue 12: |method - Retrain| within


MEASURABLE_SECONDS = 0.1  # below this an event is bookkeeping, not work (`none`: 0.002-0.013 s on ML-100K),
# and a ratio over it says nothing (1673x in the 2026-12-05 suite at the old 0.01 s floor): no speedup is taken


def _ratio(reference: float, value: float, floor: float) -> float:
    """reference / value, or NaN (an empty cell) where either is at most `floor`: a method that
    trained nothing has no speedup, not an infinite one, and a Retrain that took bookkeeping time is
    no measure of one."""
    return reference / value if value > floor and reference > floor else float("nan")
