"""What every client handler needs: the decoded task, this node's own data and model, its user part."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch
from flwr.app import Context, Message

from clients.messages import read_instruction, record_to_arrays
from fedunlearn.config import Config
from fedunlearn.fl.client import init_user
from fedunlearn.fl.federation import ClientData, Federation, cached_federation
from fedunlearn.models import build_model
from fedunlearn.models.base import Arrays, SplitModel

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


def setup(msg: Message, context: Context) -> Task:
    """Decode the instruction and find this node's own data by its partition id."""
    torch.set_num_threads(1)
    config, round_number, shared, epochs, ascent = read_instruction(msg.content)
    _, data, model = node_data(config, context)
    return Task(config, round_number, shared, epochs, ascent, data, model)


def user_part(context: Context, model: SplitModel, data: ClientData, seed: int) -> Arrays:
    if USER_STATE not in context.state.array_records:
        return init_user(model, seed, data.client_id)
    return record_to_arrays(context.state.array_records[USER_STATE])


def class_index(classes: list[str], own_value: str, attribute: str) -> int:
    if own_value not in classes:
        raise ValueError(f"this client's {attribute} is not among the {len(classes)} classes the server sent")
    return classes.index(own_value)


def classes_of(fields: Any) -> list[str]:
    return [str(value) for value in json.loads(str(fields["classes"]))]
