"""Flower ClientApp: one client per user. It keeps its user part in `context.state` across rounds
and replies with the shared-parameter update only. The work itself is in fedunlearn.federated.

Training comes as "train.fit". Bare "train" is the SecAgg+ protocol (server.secure_sum): the mod
answers its key-exchange stages and calls `secure_contribution` once for this client's vector, which
leaves the node only masked.

The post-training defences run here, on the client's own embedding (server.defence drives them):
"query.defence_start" stores a `ClientCloak` in `context.state` (and decides, for at-risk, whether
this client defends), the secure tasks class-sums / fourth-powers / cloak-products / feature-sums
read and update it, "query.defence_step" (AttrCloak) and "query.regularised_step" (D2D-R, U2U-R)
take the Adam step and "query.defence_finish" installs the defended embedding as the client's user
part; with defence.compare the trained one is kept until "query.defence_end".

"query.audit_users" is the exception to "the user part never leaves": the simulation's measurement
oracle (the attribute audit's central view, what the in-process auditor reads directly), sent only
when the run asks for the audit; it is not part of the protocol."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.branches import branch_mod, drop_branch
from fedunlearn.audit import local_outcome
from fedunlearn.config import Config
from fedunlearn.federated import init_user, local_evaluate, local_membership, local_train
from fedunlearn.federation import ClientData, Federation, cached_federation
from fedunlearn.messages import (
    CLASS_SUMS,
    CLOAK_PRODUCTS,
    FEATURE_SUMS,
    FOURTH_POWERS,
    LOCAL_AUDIT,
    arrays_to_record,
    decode_attacker,
    encode_audit_user,
    encode_evaluation,
    encode_identity,
    encode_membership,
    encode_update,
    read_array_field,
    read_defence_start,
    read_defence_step,
    read_instruction,
    read_regularised_step,
    read_secure_task,
    record_to_arrays,
)
from fedunlearn.models import Arrays, SplitModel, build_model
from fedunlearn.privacy.attrcloak import (
    AdamState,
    ClientCloak,
    DataRetention,
    adam_step,
    class_contribution,
    flatten_users,
    fourth_power_contribution,
    unflatten_users,
)
from fedunlearn.privacy.baselines import FourierFeatures, client_gradient, feature_contribution
from fedunlearn.privacy.stage import at_risk
from fedunlearn.training import resolve_device

USER_STATE = "user"
CLOAK_STATE = "cloak"  # the ClientCloak's arrays, while a defence runs
CLOAK_META = "cloak-meta"  # its flags and Adam step count
CLOAK_SHARED = "cloak-shared"  # AttrCloak-DD: the frozen shared part, for the client's own training loss
TRAINED_STATE = "trained-user"  # defence.compare: the user part as trained, every defence's start


class Task(NamedTuple):
    config: Config
    round_number: int
    shared: Arrays | None
    epochs: float | None
    ascent: bool
    data: ClientData
    model: SplitModel


def _own(config: Config, context: Context) -> tuple[Federation, ClientData, SplitModel]:
    """The federation, this node's own data (found by its partition id) and the model."""
    federation = cached_federation(config.data, config.run.seed)
    data = federation.client(int(context.node_config["partition-id"]))
    return federation, data, build_model(config.model, federation.n_items)


def _setup(msg: Message, context: Context) -> Task:
    """Decode the instruction and find this node's own data by its partition id."""
    torch.set_num_threads(1)
    config, round_number, shared, epochs, ascent = read_instruction(msg.content)
    _, data, model = _own(config, context)
    return Task(config, round_number, shared, epochs, ascent, data, model)


def _user(context: Context, model: SplitModel, data: ClientData, seed: int) -> Arrays:
    if USER_STATE not in context.state.array_records:
        return init_user(model, seed, data.client_id)
    return record_to_arrays(context.state.array_records[USER_STATE])


def whoami(msg: Message, context: Context) -> Message:
    data = _setup(msg, context).data
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def forget(msg: Message, context: Context) -> Message:
    """The client leaves and asks to be forgotten: its private state is deleted."""
    data = _setup(msg, context).data
    if USER_STATE in context.state.array_records:
        del context.state[USER_STATE]
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def membership(msg: Message, context: Context) -> Message:
    """Membership inference on this client's own interactions; only the AUC is sent."""
    config, _, shared, _, _, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    auc = local_membership(model, data, user, shared, resolve_device(config.run.device))
    return Message(encode_membership(data.client_id, auc), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    config, round_number, shared, epochs, ascent, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    device = resolve_device(config.run.device)
    update, user = local_train(model, data, user, shared, config, round_number, device, epochs, ascent)
    context.state[USER_STATE] = arrays_to_record(user)
    return Message(encode_update(update), reply_to=msg)


def audit_user(msg: Message, context: Context) -> Message:
    """The simulation's auditor reads this client's user part (a measurement, not the protocol)."""
    config, _, _, _, _, data, model = _setup(msg, context)
    return Message(encode_audit_user(data.client_id, _user(context, model, data, config.run.seed)), reply_to=msg)


def secure_contribution(msg: Message, context: Context) -> Message:
    """This client's vector for the secure task the server asked for, computed from what only it
    holds (its user part, its attribute value). The mod quantises and masks it before it leaves."""
    fields = recorddict_to_fitins(msg.content, keep_input=True).config
    config, task, bound = read_secure_task(fields)
    federation, data, model = _own(config, context)
    if task == CLOAK_PRODUCTS:
        vector = _cloak_products(fields, context, config, data, model)
    else:
        attribute = str(fields["attribute"])
        own_value = str(federation.dataset.attributes.iloc[data.index][attribute])
        if task == LOCAL_AUDIT:
            own_features = flatten_users(model, [_user(context, model, data, config.run.seed)])[0]
            vector = local_outcome(decode_attacker(bytes(fields["attacker"])), own_features, own_value)
        elif task == CLASS_SUMS:
            classes = _classes(fields)
            if bool(fields.get("defence", False)):  # during AttrCloak: the embedding as defended so far
                own_features = _load_cloak(context).current
            else:
                own_features = flatten_users(model, [_user(context, model, data, config.run.seed)])[0]
            vector = class_contribution(own_features, _class_index(classes, own_value, attribute), len(classes))
        elif task == FEATURE_SUMS:
            vector = _feature_sums(fields, context, _class_index(_classes(fields), own_value, attribute))
        elif task == FOURTH_POWERS:
            classes = _classes(fields)
            means, global_mean = read_array_field(fields["means"]), read_array_field(fields["global-mean"])
            label = _class_index(classes, own_value, attribute)
            vector = fourth_power_contribution(_load_cloak(context).original, label, means, global_mean, len(classes))
        else:
            raise ValueError(f"unknown secure task {task!r}")
    if not np.all(np.abs(vector) <= bound):  # SecAgg+ would clip silently; the value itself is not told
        raise ValueError(f"a {task} contribution lies outside the secure sum's bound +-{bound}: ask for a larger one")
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics={})
    return Message(fitres_to_recorddict(reply, keep_input=False), reply_to=msg)


def _class_index(classes: list[str], own_value: str, attribute: str) -> int:
    if own_value not in classes:
        raise ValueError(f"this client's {attribute} is not among the {len(classes)} classes the server sent")
    return classes.index(own_value)


def _classes(fields: Any) -> list[str]:
    return [str(value) for value in json.loads(str(fields["classes"]))]


def _feature_sums(fields: Any, context: Context, label: int) -> np.ndarray:
    """D2D-R: this client's one-hot class and the Fourier features of its embedding as defended so
    far, in its class's block."""
    current = _load_cloak(context).current
    phi = FourierFeatures(len(current), float(fields["scale"]), int(fields["seed"]))
    features = phi(torch.as_tensor(current)[None]).numpy()
    return feature_contribution(features, np.array([label]), len(_classes(fields)))[0]


def _cloak_products(fields: Any, context: Context, config: Config, data: ClientData, model: SplitModel) -> np.ndarray:
    """AttrCloak step, first half: this client's g_AU (from the broadcast gradients of the attribute
    loss) and g_R, kept for the step; only their three dot products leave, masked."""
    cloak = _load_cloak(context)
    step, n_attributes = int(fields["step"]), int(fields["attributes"])
    gradients = [
        (torch.as_tensor(read_array_field(fields[f"grad-sums-{j}"])),
         torch.as_tensor(read_array_field(fields[f"grad-outers-{j}"])))
        for j in range(n_attributes)
    ]  # fmt: skip
    retention = None
    if str(fields["variant"]) == "dd" and cloak.defending:
        shared = record_to_arrays(context.state.array_records[CLOAK_SHARED])
        own = DataRetention(model, shared, [data.train_items], [data.client_id], config.model.loss,
                            config.model.negatives, config.run.seed, config.defence.batch)  # fmt: skip
        retention = own.gradient(torch.as_tensor(cloak.current)[None], step)[0].numpy()
    vector = cloak.products(gradients, retention)
    _save_cloak(context, cloak)
    return vector


def _save_cloak(context: Context, cloak: ClientCloak) -> None:
    arrays = {"original": cloak.original, "current": cloak.current, "labels": np.asarray(cloak.labels, np.int64)}
    if cloak.adam is not None:
        arrays |= {"exp-avg": cloak.adam.exp_avg, "exp-avg-sq": cloak.adam.exp_avg_sq}
    if cloak.grad_au is not None and cloak.grad_r is not None:
        arrays |= {"grad-au": cloak.grad_au, "grad-r": cloak.grad_r}
    context.state[CLOAK_STATE] = arrays_to_record(arrays)
    step = -1 if cloak.adam is None else cloak.adam.step
    context.state[CLOAK_META] = ConfigRecord({"defending": cloak.defending, "adam-step": step})


def _load_cloak(context: Context) -> ClientCloak:
    if CLOAK_STATE not in context.state.array_records:
        raise RuntimeError("an AttrCloak message before query.defence_start")
    arrays = record_to_arrays(context.state.array_records[CLOAK_STATE])
    meta = context.state.config_records[CLOAK_META]
    step = int(meta["adam-step"])
    adam = None if step < 0 else AdamState(step, arrays["exp-avg"], arrays["exp-avg-sq"])
    cloak = ClientCloak(arrays["original"], arrays["current"], [int(v) for v in arrays["labels"]],
                        bool(meta["defending"]), adam, arrays.get("grad-au"), arrays.get("grad-r"))  # fmt: skip
    return cloak


def _drop_cloak(context: Context) -> None:
    for key in (CLOAK_STATE, CLOAK_META, CLOAK_SHARED):
        if key in context.state:
            del context.state[key]


def defence_start(msg: Message, context: Context) -> Message:
    """A defence begins: this client notes its own embedding and its class in each attribute, and
    whether it defends (at-risk: it decides alone, from the shipped attackers)."""
    torch.set_num_threads(1)
    config, start = read_defence_start(msg.content)
    federation, data, model = _own(config, context)
    if start.keep_trained:
        _keep_trained(context, model, data, config.run.seed)
    own = flatten_users(model, [_user(context, model, data, config.run.seed)])[0]
    values = federation.dataset.attributes.iloc[data.index]
    labels = [
        _class_index([str(c) for c in cls], str(values[name]), name)
        for name, cls in zip(start.attributes, start.classes, strict=True)
    ]
    defending = start.defending
    if defending is None:
        own_attributes = federation.dataset.attributes.iloc[[data.index]]
        defending = bool(at_risk(start.attackers, own[None], own_attributes, start.risk_threshold)[0])
    _drop_cloak(context)
    _save_cloak(context, ClientCloak.start(own, labels, defending))
    if start.shared is not None:
        context.state[CLOAK_SHARED] = arrays_to_record(start.shared)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def _keep_trained(context: Context, model: SplitModel, data: ClientData, seed: int) -> None:
    """defence.compare: the first defence keeps the trained user part, every later one starts from it."""
    if TRAINED_STATE in context.state.array_records:
        context.state[USER_STATE] = arrays_to_record(record_to_arrays(context.state.array_records[TRAINED_STATE]))
    else:
        context.state[TRAINED_STATE] = arrays_to_record(_user(context, model, data, seed))


def defence_end(msg: Message, context: Context) -> Message:
    """After defence.compare: drop the trained user part, going back to it first if asked."""
    data = _setup(msg, context).data
    if bool(msg.content.config_records["defence"]["restore"]):
        context.state[USER_STATE] = context.state.array_records[TRAINED_STATE]
    del context.state[TRAINED_STATE]
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def regularised_step(msg: Message, context: Context) -> Message:
    """D2D-R / U2U-R step: from the broadcast dL/dsums, this client's own gradient and Adam step."""
    torch.set_num_threads(1)
    data = _setup(msg, context).data
    method, gradients, weight, lr, n_clients, scale, seed = read_regularised_step(msg.content)
    cloak = _load_cloak(context)
    if cloak.defending:
        current = torch.as_tensor(cloak.current)[None]
        phi = FourierFeatures(current.shape[1], scale, seed) if method == "d2d-r" else None
        labels = [np.array([label]) for label in cloak.labels]
        parts = [tuple(torch.as_tensor(part) for part in gradient) for gradient in gradients]
        grad = client_gradient(method, current, torch.as_tensor(cloak.original)[None], labels, parts, weight,
                               n_clients, phi)  # fmt: skip
        cloak.current, cloak.adam = adam_step(cloak.current, grad[0].numpy(), cloak.adam, lr)
        _save_cloak(context, cloak)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def defence_step(msg: Message, context: Context) -> Message:
    """AttrCloak step, second half: the Adam step with the weight the server found from the sums."""
    torch.set_num_threads(1)
    data = _setup(msg, context).data
    weight, lr = read_defence_step(msg.content)
    cloak = _load_cloak(context)
    cloak.step(weight, lr)
    _save_cloak(context, cloak)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def defence_finish(msg: Message, context: Context) -> Message:
    """AttrCloak ends: the defended embedding becomes this client's user part."""
    config, _, _, _, _, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    context.state[USER_STATE] = arrays_to_record(unflatten_users([user], _load_cloak(context).current[None])[0])
    _drop_cloak(context)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config, _, shared, _, _, data, model = _setup(msg, context)
    user = _user(context, model, data, config.run.seed)
    evaluation = local_evaluate(model, data, user, shared, config, resolve_device(config.run.device))
    return Message(encode_evaluation(evaluation), reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp with every handler above, each able to work on a branch of the state (clients.branches)."""
    client = ClientApp(mods=[branch_mod])
    client.query("whoami")(whoami)
    client.query("forget")(forget)
    client.query("membership")(membership)
    client.query("defence_start")(defence_start)
    client.query("defence_step")(defence_step)
    client.query("defence_finish")(defence_finish)
    client.query("regularised_step")(regularised_step)
    client.query("defence_end")(defence_end)
    client.query("audit_users")(audit_user)
    client.query("drop_branch")(drop_branch)
    client.train("fit")(train)
    client.train(mods=[secaggplus_mod])(secure_contribution)
    client.evaluate()(evaluate)
    return client


app = make_client_app()
