"""How the plain client/server values travel in Flower messages, in one place.

Every reply carries the client's stable id (the dataset's user id) in a `meta` ConfigRecord; Flower
node ids are mapped to it once, by the whoami query, and nowhere else.

Ordinary training travels as "train.fit": Flower's `secaggplus_mod` acts on messages of type exactly
"train", which are kept for SecAgg+ rounds. Such a round ships a secure task (a flat dict that fits a
ConfigRecord) and its replies carry nothing but masked vectors and key material.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from fedunlearn.config import Config, config_from_dict
from fedunlearn.fl.client import defends_upload
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models.base import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.portable import attacker_from_bytes, attacker_to_bytes
from fedunlearn.privacy.registry import DEFENCES

TRAIN = "train.fit"
WHOAMI = "query.whoami"
FORGET = "query.forget"
MEMBERSHIP = "query.membership"
DEFENCE_START = "query.defence_start"
DEFENCE_STEP = "query.defence_step"
DEFENCE_FINISH = "query.defence_finish"
REGULARISED_STEP = "query.regularised_step"  # D2D-R / U2U-R: the broadcast dL/dsums, each client steps itself
DEFENCE_END = "query.defence_end"  # after defence.compare: keep the last defence's user part or the trained one
# The simulation's measurement oracle, not part of the protocol: the only reply that carries a user
# part. The server sends it only when the run asks for the attribute audit (server/audit.py).
AUDIT_USERS = "query.audit_users"
DROP_BRANCH = "query.drop_branch"  # a fork of the server is done: drop its branch of the client's state

# secure tasks: what a client adds to a SecAgg+ sum
LOCAL_AUDIT = "local-audit"  # privacy.audit.local_outcome of the shipped attacker on the client's own embedding
CLASS_SUMS = "class-sums"  # fedunlearn.privacy.attrcloak.class_contribution of the client's own embedding
FOURTH_POWERS = "fourth-powers"  # fedunlearn.privacy.attrcloak.fourth_power_contribution, for the shrinkage
CLOAK_PRODUCTS = "cloak-products"  # fedunlearn.privacy.attrcloak.client_products of the client's own gradients
FEATURE_SUMS = "feature-sums"  # fedunlearn.privacy.baselines.feature_contribution (D2D-R) of the client's own embedding
SECURE_UPDATE = "secure-update"  # fedunlearn.fl.secure_round: the training upload, summed (defence.upload = secagg)
SECURE_ROWS = "secure-rows"  # fedunlearn.fl.secure_round: the rows the upload touched, counted (secagg_min_clients)
SECURE_TASKS = (LOCAL_AUDIT, CLASS_SUMS, FOURTH_POWERS, CLOAK_PRODUCTS, FEATURE_SUMS, SECURE_ROWS, SECURE_UPDATE)
KEPT_ROWS = "kept-rows"  # SECURE_UPDATE's field: the rows enough clients touched (secagg_min_clients > 1)
PENDING_UPDATE = "pending-update"  # under secagg: the round's upload, kept on the client until the secure sum
BOUND = "bound"  # set by server.secure_sum: every contributed value must lie within +-bound


def arrays_to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def told(config: Config, defends: bool = False) -> str:
    """The config as every message carries it: without the clients who leave or never join (the drop
    schedule, `data.exclude_clients`), who attack (`unlearn.attackers`; each attacker is told its own
    part in its own messages, `instruction`'s `attacker`) and who defend (`defence.client_ids`: under
    `defence.clients = "listed"` a client is told only whether it defends itself, as `defends`: its
    upload defence, or `defence.upload = "none"`), so no message names another client, a removed one
    included. Clients read none of these."""
    return _told(json.dumps(config.to_dict()), defends)


@functools.lru_cache(maxsize=8)
def _told(text: str, defends: bool) -> str:
    values = json.loads(text)
    values["unlearn"] |= {"drop": "", "drop_random": "", "attackers": []}
    values["data"]["exclude_clients"] = []
    defence = values["defence"]
    if defence["clients"] == "listed":
        defence |= {"clients": "all", "upload": defence["upload"] if defends else "none"}
    defence["client_ids"] = []
    return json.dumps(values)


def own_part(config: Config, client_id: str) -> tuple[bool, bool]:
    """What a client's messages tell it of its own part (`instruction`'s `attacker`, `defends`):
    whether it is a poisoning attacker, and whether it is a listed client that defends its upload
    (always False where `told` does not depend on it, so contents are built once per part)."""
    listed = config.defence.clients == "listed"
    return client_id in config.unlearn.attackers, listed and defends_upload(config, client_id)


def instruction(
    config: Config,
    round_number: int = 0,
    shared: Arrays | None = None,
    epochs: float | None = None,
    ascent: bool = False,
    branch: str = "",
    attacker: bool = False,
    defends: bool = False,
) -> RecordDict:
    """A task for a client; a non-empty `branch` makes it work on that branch of its private state
    (clients.branches), the run's own state when empty; `attacker`: the client is one of the run's
    poisoning attackers (`unlearn.attackers`, which the config it carries leaves out); `defends`: it
    is one of the listed clients that defend their upload (`told`)."""
    task = {"config": told(config, defends), "round": round_number, "ascent": ascent, "attacker": attacker}
    if epochs is not None:
        task["epochs"] = float(epochs)
    if branch:
        task["branch"] = branch
    content = RecordDict({"task": ConfigRecord(task)})
    if shared is not None:
        content["shared"] = arrays_to_record(shared)
    return content


def read_instruction(content: RecordDict) -> tuple[Config, int, Arrays | None, float | None, bool]:
    """(config, round, shared parameters, epochs, ascent); an attacker's own part is `told_attacker`."""
    task = content.config_records["task"]
    shared = record_to_arrays(content.array_records["shared"]) if "shared" in content.array_records else None
    epochs = float(task["epochs"]) if "epochs" in task else None
    return decoded_config(str(task["config"])), int(task["round"]), shared, epochs, bool(task["ascent"])


def with_release(content: RecordDict, release: int) -> RecordDict:
    """The same task for a client that sent `release` LDP-noised uploads before (its noise's key,
    fl.client.finish_update); the shared parameters' record is the same object, not a copy."""
    out = RecordDict({"task": ConfigRecord({**content.config_records["task"], "release": release})})
    for key, record in content.array_records.items():
        out[key] = record
    return out


def told_release(content: RecordDict) -> int:
    """How many LDP-noised uploads the server counted from this client before this task."""
    return int(content.config_records["task"].get("release", 0))


def told_attacker(content: RecordDict) -> bool:
    """Whether the message tells its client that it is one of the run's poisoning attackers."""
    return bool(content.config_records["task"].get("attacker", False))


@functools.lru_cache(maxsize=8)
def decoded_config(text: str) -> Config:
    """The config a message carries, validated once per client process (it is the same in every
    message of a run, and validating took ~9 ms, paid by every client for every message). Safe to
    share: a validated Config is frozen."""
    return config_from_dict(json.loads(text))


def branch_of(content: RecordDict) -> str:
    """The branch of the client's state a message works on ("" for the run's own state). Messages
    without a task (SecAgg+ stages) always work on the run's own state."""
    task = content.config_records.get("task")
    return str(task.get("branch", "")) if task is not None else ""


def encode_drop_branch(config: Config, branch: str) -> RecordDict:
    """DROP_BRANCH names the branch outside the task, so the message itself runs on the run's state."""
    content = instruction(config)
    content["drop"] = ConfigRecord({"branch": branch})
    return content


def read_drop_branch(content: RecordDict) -> str:
    return str(content.config_records["drop"]["branch"])


def _meta(client_id: str, **extra: int | str) -> ConfigRecord:
    return ConfigRecord({"client-id": client_id, **extra})


def client_id_of(content: RecordDict) -> str:
    return str(content.config_records["meta"]["client-id"])


def encode_update(update: ClientUpdate) -> RecordDict:
    arrays = {"item_ids": update.item_ids}
    arrays |= {f"rows.{key}": value for key, value in update.rows.items()}
    arrays |= {f"dense.{key}": value for key, value in update.dense.items()}
    return RecordDict(
        {
            "update": arrays_to_record(arrays),
            "metrics": MetricRecord(
                {
                    "num-examples": update.num_examples, "loss": update.loss,
                    "epochs": update.epochs, "steps": update.steps,
                }  # fmt: skip
            ),
            "meta": _meta(update.client_id),
        }
    )


def _count(value: Any) -> Any:
    """A count as sent: an int when it is whole, else the number itself, so the server's checks
    (fl.replies) see a fractional count instead of one rounded down here."""
    number = float(value)
    return int(number) if number.is_integer() else number


UPDATE_METRICS = frozenset({"num-examples", "loss", "epochs", "steps"})
EVALUATION_METRICS = frozenset({"rank", "valid-rank", "full-rank", "target-rank"})


def _fields(record: Mapping[str, Any], expected: frozenset[str], what: str) -> None:
    if set(record) != expected:
        extra, missing = sorted(set(record) - expected), sorted(expected - set(record))
        raise ValueError(f"{what} with extra fields {extra} or missing fields {missing}")


def decode_update(content: RecordDict) -> ClientUpdate:
    arrays = record_to_arrays(content.array_records["update"])
    metrics = content.metric_records["metrics"]
    _fields(metrics, UPDATE_METRICS, "training metrics")
    strays = [key for key in arrays if key != "item_ids" and not key.startswith(("rows.", "dense."))]
    if strays or "item_ids" not in arrays:
        raise ValueError(f"an upload with arrays {sorted(arrays)}: expected item_ids, rows.* and dense.*")
    return ClientUpdate(
        client_id=client_id_of(content),
        num_examples=_count(metrics["num-examples"]),
        item_ids=arrays["item_ids"],
        rows={key[5:]: value for key, value in arrays.items() if key.startswith("rows.")},
        dense={key[6:]: value for key, value in arrays.items() if key.startswith("dense.")},
        loss=float(metrics["loss"]),
        epochs=float(metrics["epochs"]),
        steps=_count(metrics["steps"]),
    )


def encode_evaluation(evaluation: ClientEvaluation) -> RecordDict:
    metrics = MetricRecord(
        {
            "rank": evaluation.rank,
            "valid-rank": evaluation.valid_rank,
            "full-rank": evaluation.full_rank,
            "target-rank": evaluation.target_rank,
        }
    )
    return RecordDict({"metrics": metrics, "meta": _meta(evaluation.client_id)})


def keep_pending_update(state: RecordDict, update: ClientUpdate, round_number: int) -> None:
    """Under secure aggregation the upload stays on the client (in its own state) until the secure
    sum of that round asks for its contribution."""
    encoded = encode_update(update)
    state[f"{PENDING_UPDATE}.update"] = encoded.array_records["update"]
    state[f"{PENDING_UPDATE}.metrics"] = encoded.metric_records["metrics"]
    state[f"{PENDING_UPDATE}.meta"] = ConfigRecord({**encoded.config_records["meta"], "round": round_number})


def pending_update(state: RecordDict, round_number: int, take: bool) -> ClientUpdate:
    """The upload kept for that round's secure sum; `take`: removed from the state (its last use)."""
    meta = state.config_records.get(f"{PENDING_UPDATE}.meta")
    if meta is None or int(meta["round"]) != round_number:
        raise ValueError(f"no upload of round {round_number} is waiting for the secure sum on this client")
    content = RecordDict({name: state[f"{PENDING_UPDATE}.{name}"] for name in ("update", "metrics", "meta")})
    if take:
        for name in ("update", "metrics", "meta"):
            del state[f"{PENDING_UPDATE}.{name}"]
    return decode_update(content)


def decode_evaluation(content: RecordDict) -> ClientEvaluation:
    metrics = content.metric_records["metrics"]
    _fields(metrics, EVALUATION_METRICS, "evaluation metrics")
    return ClientEvaluation(
        client_id_of(content),
        _count(metrics["rank"]),
        _count(metrics["valid-rank"]),
        _count(metrics["full-rank"]),
        _count(metrics["target-rank"]),
    )


def encode_identity(client_id: str, index: int) -> RecordDict:
    return RecordDict({"meta": _meta(client_id, index=index)})


def decode_identity(content: RecordDict) -> tuple[str, int]:
    meta = content.config_records["meta"]
    return str(meta["client-id"]), int(meta["index"])


def encode_membership(client_id: str, auc: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"membership-auc": auc}), "meta": _meta(client_id)})


def decode_membership(content: RecordDict) -> tuple[str, float]:
    return client_id_of(content), float(content.metric_records["metrics"]["membership-auc"])


def encode_audit_user(client_id: str, user: Arrays) -> RecordDict:
    """The client's user part, for the simulation's auditor only (AUDIT_USERS)."""
    return RecordDict({"user": arrays_to_record(user), "meta": _meta(client_id)})


def decode_audit_user(content: RecordDict) -> tuple[str, Arrays]:
    return client_id_of(content), record_to_arrays(content.array_records["user"])


def secure_task(config: Config, task: str, **fields: Any) -> dict[str, Any]:
    """The settings of one secure sum, as the FitIns config of a SecAgg+ round (its values: str, bytes,
    bool, int or float; a list travels as JSON)."""
    if task not in SECURE_TASKS:
        raise ValueError(f"unknown secure task {task!r}: choose one of {', '.join(SECURE_TASKS)}")
    return {"task": task, "config": told(config), **fields}


def read_secure_task(fields: Mapping[str, Any]) -> tuple[Config, str, float]:
    """(config, task name, bound); the task's own fields stay in `fields`."""
    return decoded_config(str(fields["config"])), str(fields["task"]), float(fields[BOUND])


def array_field(array: np.ndarray) -> bytes:
    """An array as a secure task's field (FitIns config values are scalars, bytes among them)."""
    return ndarray_to_bytes(np.ascontiguousarray(array))


def read_array_field(blob: Any) -> np.ndarray:
    return bytes_to_ndarray(bytes(blob))


@dataclass
class DefenceStart:
    """What a client is told when a defence begins: the attributes and their classes (its class
    index is the position of its own value), whether it defends (None: it decides alone, from the
    shipped `attackers` and `risk_threshold`), for AttrCloak-DD the frozen shared part, and with
    `keep_trained` (defence.compare) that every defence starts from the trained user part."""

    attributes: list[str]
    classes: list[list[str]]  # per attribute, the classes its sums keep (fedunlearn.privacy.cells)
    left_out: dict[str, list[str]]  # per attribute, the values whose holders send zeros to every sum
    defending: bool | None
    shared: Arrays | None = None
    attackers: list[Attacker] = field(default_factory=list)
    risk_threshold: float = 0.5
    keep_trained: bool = False


def encode_defence_start(config: Config, start: DefenceStart) -> RecordDict:
    content = instruction(config, shared=start.shared)
    fields: dict[str, Any] = {"attributes": json.dumps(start.attributes), "classes": json.dumps(start.classes),
                              "left-out": json.dumps(start.left_out)}  # fmt: skip
    fields |= {"risk-threshold": float(start.risk_threshold), "keep-trained": start.keep_trained}
    if start.defending is not None:
        fields["defending"] = start.defending
    content["defence"] = ConfigRecord(fields)
    content["attackers"] = ConfigRecord({str(i): attacker_to_bytes(a) for i, a in enumerate(start.attackers)})
    return content


def read_defence_start(content: RecordDict) -> tuple[Config, DefenceStart]:
    config, _, shared, _, _ = read_instruction(content)
    fields = content.config_records["defence"]
    attackers = content.config_records["attackers"]
    defending = bool(fields["defending"]) if "defending" in fields else None
    start = DefenceStart(
        json.loads(str(fields["attributes"])), json.loads(str(fields["classes"])),
        json.loads(str(fields["left-out"])), defending, shared,
        [attacker_from_bytes(bytes(attackers[str(i)])) for i in range(len(attackers))],
        float(fields["risk-threshold"]), bool(fields["keep-trained"]),
    )  # fmt: skip
    return config, start


def encode_defence_step(config: Config, weight: float, lr: float) -> RecordDict:
    content = instruction(config)
    content["defence"] = ConfigRecord({"weight": float(weight), "lr": float(lr)})
    return content


def read_defence_step(content: RecordDict) -> tuple[float, float]:
    """(weight on the attribute loss, Adam's learning rate), refused unless a weight in [0, 1] and a
    positive finite rate: a client would otherwise step its embedding to NaN or climb its retention."""
    fields = content.config_records["defence"]
    weight, lr = float(fields["weight"]), float(fields["lr"])
    if not 0 <= weight <= 1 or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"an AttrCloak step needs a weight in [0, 1] and a positive learning rate; got {weight}, {lr}")
    return weight, lr


def encode_regularised_step(
    config: Config, method: str, gradients: list[tuple[np.ndarray, ...]], weight: float, lr: float, n_clients: int,
    scale: float, seed: int,
) -> RecordDict:  # fmt: skip
    """D2D-R / U2U-R step: dL/dsums per attribute (`gradients[j][i]`), the retention weight, Adam's
    learning rate, the number of clients, and for D2D-R the Fourier features' scale and seed."""
    content = instruction(config)
    content["defence"] = ConfigRecord({"method": method, "weight": float(weight), "lr": float(lr),
                                       "clients": n_clients, "attributes": len(gradients),
                                       "parts": len(gradients[0]), "scale": float(scale), "seed": seed})  # fmt: skip
    content["gradients"] = arrays_to_record(
        {f"{j}.{i}": part for j, parts in enumerate(gradients) for i, part in enumerate(parts)}
    )
    return content


def read_regularised_step(content: RecordDict) -> tuple[str, list[list[np.ndarray]], float, float, int, float, int]:
    """(method, gradients, weight, lr, number of clients, scale, seed)."""
    fields = content.config_records["defence"]
    arrays = record_to_arrays(content.array_records["gradients"])
    parts = range(int(fields["parts"]))
    gradients = [[arrays[f"{j}.{i}"] for i in parts] for j in range(int(fields["attributes"]))]
    weight, lr, scale = float(fields["weight"]), float(fields["lr"]), float(fields["scale"])
    method = str(fields["method"])
    if method not in DEFENCES or DEFENCES[method].loop != "regularised":
        raise ValueError(f"a regularised step for {method!r}; the clients run d2d-r and u2u-r that way")
    if not all(np.isfinite(v) for v in (weight, lr, scale)) or weight < 0 or lr <= 0:
        raise ValueError(f"a {method} step needs a finite weight >= 0 and learning rate > 0; got {weight}, {lr}")
    return method, gradients, weight, lr, int(fields["clients"]), scale, int(fields["seed"])


