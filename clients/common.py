"""What every client handler needs: the decoded task, this node's own data and model, its user part."""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from clients.messages import read_instruction, record_to_arrays, told_attacker
from fedunlearn.config import Config, derive, with_private_seed
from fedunlearn.fl.client import init_user
from fedunlearn.fl.federation import ClientData, Federation, cached_federation
from fedunlearn.models import build_model
from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.privacy.common import LEFT_OUT

USER_STATE = "user"
# Set only by fedunlearn's own simulation runner (server.simulation), in its process and its Ray workers'
# environment: a client that runs anywhere else (a SuperNode on a deployment) refuses the audit oracle.
SIMULATION_ORACLE_ENV = "FEDUNLEARN_SIMULATION_ORACLE"


class Task(NamedTuple):
    config: Config
    round_number: int
    shared: Arrays | None
    epochs: float | None
    ascent: bool
    data: ClientData
    model: SplitModel


def node_data(config: Config, context: Context) -> tuple[Federation, ClientData, SplitModel]:
    """The federation, this node's own data (found by its partition id) and the model."""
    federation = cached_federation(config.data, config.run.seed)
    data = federation.client(int(context.node_config["partition-id"]))
    return federation, data, build_model(config.model, federation.n_items)


PINNED = "pinned"  # what a client holds the server to for the whole run (the promoted item)
NOISE_SECRET = "noise-secret"  # a SuperNode's --node-config key: the seed of its client's own defence draws


def with_own_secret(config: Config, context: Context) -> Config:
    """The config with this client's own secret for its defence draws, where its SuperNode was given
    one (`--node-config noise-secret=N`; config.defence.private_seed): then no one else can draw its
    LDP noise, pseudo-items or AttrCloak pseudo-classes again. Without one, run.seed (simulation)."""
    if NOISE_SECRET not in context.node_config:
        return config
    return with_private_seed(config, int(context.node_config[NOISE_SECRET]))


def setup(msg: Message, context: Context) -> Task:
    """Decode the instruction and find this node's own data by its partition id. What the server sends
    is checked before anything runs on it: shared parameters of the run's model (names, shapes, finite
    floats), a positive number of epochs, and one promoted item for the whole run."""
    torch.set_num_threads(1)
    config, round_number, shared, epochs, ascent = read_instruction(msg.content)
    _, data, model = node_data(config, context)
    if told_attacker(msg.content):  # its own part, which the config it carries leaves out (messages.told)
        config = derive(config, {"unlearn.attackers": [data.client_id]})
    config = with_own_secret(config, context)
    if shared is not None:
        problem = shared_problem(shared, model)
        if problem:
            raise ValueError(f"the server sent shared parameters that do not fit this run's model: {problem}")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"the server asked for {epochs} epochs: a positive number is needed")
    pin_target(context, config.unlearn.target_item)
    return Task(config, round_number, shared, epochs, ascent, data, model)


def shared_problem(shared: Arrays, model: SplitModel) -> str:
    """Why `shared` cannot be the model's shared part ('' when it can)."""
    expected = _shared_shapes(model)
    if set(shared) != set(expected):
        return f"tensors {sorted(shared)}, expected {sorted(expected)}"
    for key, value in shared.items():
        if value.shape != expected[key] or not np.issubdtype(value.dtype, np.floating):
            return f"{key} is {value.dtype} {value.shape}, expected floats {expected[key]}"
        if not np.isfinite(value).all():
            return f"{key} holds NaN or inf"
    return ""


def _shared_shapes(model: SplitModel) -> dict[str, tuple[int, ...]]:
    return {key: value.shape for key, value in model.init_shared(np.random.default_rng(0)).items()}


def pin_target(context: Context, target_item: int) -> None:
    """The item whose rank a client reports (ER@10) is the run's one promoted item, or none (-1) for
    the whole run: a server that changed it from message to message (or on branches of the state,
    clients.branches) would read the client's ranking of every item, one item each."""
    pinned = context.state.config_records.get(PINNED)
    if pinned is None:
        context.state[PINNED] = ConfigRecord({"target-item": target_item})
    elif int(pinned["target-item"]) != target_item:
        raise ValueError(f"the server asked for the rank of item {target_item} after item {pinned['target-item']} in "
                         "the same run: refused (one promoted item per run)")  # fmt: skip


def user_part(context: Context, model: SplitModel, data: ClientData, seed: int) -> Arrays:
    if USER_STATE not in context.state.array_records:
        return init_user(model, seed, data.client_id)
    return record_to_arrays(context.state.array_records[USER_STATE])


def class_index(classes: list[str], left_out: dict[str, list[str]], own: Any, attribute: str) -> int:
    """This client's class of `attribute` among those the server sums (`own`: its attribute
    values by name), or LEFT_OUT when it holds a value, of any defended attribute, too few clients
    share to sum (fedunlearn.privacy.cells): it then sends zeros."""
    if any(str(own[name]) in [str(value) for value in values] for name, values in left_out.items()):
        return LEFT_OUT
    own_value = str(own[attribute])
    if own_value not in classes:
        raise ValueError(f"this client's {attribute} is not among the {len(classes)} classes the server sent")
    return classes.index(own_value)


def own_class(fields: Any, own: Any, attribute: str) -> tuple[int, int]:
    """(`class_index` from a task's "classes" and "left-out", the number of classes summed)."""
    classes = [str(value) for value in json.loads(str(fields["classes"]))]
    left_out = json.loads(str(fields["left-out"]))
    if not isinstance(left_out, dict) or not all(isinstance(values, list) for values in left_out.values()):
        raise ValueError(f"left-out must map attributes to lists of values; got {left_out!r}")
    return class_index(classes, left_out, own, attribute), len(classes)
