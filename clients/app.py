"""Flower ClientApp: one client per user. It keeps its user part in `context.state` across rounds
and replies with the shared-parameter update only. The work itself is in fedunlearn.federated.

Training comes as "train.fit". Bare "train" is the SecAgg+ protocol (server.secure_sum): the mod
answers its key-exchange stages and calls `secure_contribution` once for this client's vector, which
leaves the node only masked."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedunlearn.audit import local_outcome
from fedunlearn.config import Config
from fedunlearn.federated import init_user, local_evaluate, local_membership, local_train
from fedunlearn.federation import ClientData, cached_federation
from fedunlearn.messages import (
    CLASS_SUMS,
    LOCAL_AUDIT,
    arrays_to_record,
    decode_attacker,
    encode_evaluation,
    encode_identity,
    encode_membership,
    encode_update,
    read_instruction,
    read_secure_task,
    record_to_arrays,
)
from fedunlearn.models import Arrays, SplitModel, build_model
from fedunlearn.privacy.attrcloak import class_contribution, flatten_users
from fedunlearn.training import resolve_device

app = ClientApp()
USER_STATE = "user"


class Task(NamedTuple):
    config: Config
    round_number: int
    shared: Arrays | None
    epochs: float | None
    ascent: bool
    data: ClientData
    model: SplitModel


def _setup(msg: Message, context: Context) -> Task:
    """Decode the instruction and find this node's own data by its partition id."""
    torch.set_num_threads(1)
    config, round_number, shared, epochs, ascent = read_instruction(msg.content)
    federation = cached_federation(config.data, config.run.seed)
    data = federation.client(int(context.node_config["partition-id"]))
    model = build_model(config.model, federation.n_items)
    return Task(config, round_number, shared, epochs, ascent, data, model)


def _user(context: Context, model: SplitModel, data: ClientData, seed: int) -> Arrays:
    if USER_STATE not in context.state.array_records:
        return init_user(model, seed, data.client_id)
    return record_to_arrays(context.state.array_records[USER_STATE])


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    data = _setup(msg, context).data
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


@app.query("forget")
def forget(msg: Message, context: Context) -> Message:
    """The client leaves and asks to be forgotten: its private state is deleted."""
    data = _setup(msg, context).data
    if USER_STATE in context.state.array_records:
        del context.state[USER_STATE]
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


@app.query("membership")
def membership(msg: Message, context: Context) -> Message:
    """Membership inference on this client's own interactions; only the AUC is sent."""
    config, _, shared, _, _, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    auc = local_membership(model, data, user, shared, resolve_device(config.run.device))
    return Message(encode_membership(data.client_id, auc), reply_to=msg)


@app.train("fit")
def train(msg: Message, context: Context) -> Message:
    config, round_number, shared, epochs, ascent, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    device = resolve_device(config.run.device)
    update, user = local_train(model, data, user, shared, config, round_number, device, epochs, ascent)
    context.state[USER_STATE] = arrays_to_record(user)
    return Message(encode_update(update), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def secure_contribution(msg: Message, context: Context) -> Message:
    """This client's vector for the secure task the server asked for, computed from what only it
    holds (its user part, its attribute value). The mod quantises and masks it before it leaves."""
    fields = recorddict_to_fitins(msg.content, keep_input=True).config
    config, task, bound = read_secure_task(fields)
    federation = cached_federation(config.data, config.run.seed)
    data = federation.client(int(context.node_config["partition-id"]))
    model = build_model(config.model, federation.n_items)
    own_features = flatten_users(model, [_user(context, model, data, config.run.seed)])[0]
    attribute = str(fields["attribute"])
    own_value = str(federation.dataset.attributes.iloc[data.index][attribute])
    if task == LOCAL_AUDIT:
        vector = local_outcome(decode_attacker(bytes(fields["attacker"])), own_features, own_value)
    elif task == CLASS_SUMS:
        classes = [str(value) for value in json.loads(str(fields["classes"]))]
        vector = class_contribution(own_features, classes.index(own_value), len(classes))
    else:
        raise ValueError(f"unknown secure task {task!r}")
    if not np.all(np.abs(vector) <= bound):  # SecAgg+ would clip silently; the value itself is not told
        raise ValueError(f"a {task} contribution lies outside the secure sum's bound +-{bound}: ask for a larger one")
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics={})
    return Message(fitres_to_recorddict(reply, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _, shared, _, _, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    evaluation = local_evaluate(model, data, user, shared, config, resolve_device(config.run.device))
    return Message(encode_evaluation(evaluation), reply_to=msg)
