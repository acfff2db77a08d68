"""The post-training defences on the client (server.defence drives them): "query.defence_start"
stores a `ClientCloak` in `context.state` (and decides, for at-risk, whether this client defends),
the secure tasks class-sums / fourth-powers / cloak-products / feature-sums read and update it
(clients.app.secure_contribution), "query.defence_step" (AttrCloak) and "query.regularised_step"
(D2D-R, U2U-R) take the Adam step and "query.defence_finish" installs the defended embedding as the
client's user part; with defence.compare the trained one is kept until "query.defence_end"."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from clients.common import USER_STATE, class_index, node_data, own_class, setup, user_part
from clients.messages import (
    arrays_to_record,
    encode_identity,
    read_array_field,
    read_defence_start,
    read_defence_step,
    read_regularised_step,
    record_to_arrays,
)
from fedunlearn.config import Config
from fedunlearn.fl.federation import ClientData
from fedunlearn.models.base import SplitModel
from fedunlearn.privacy.attrcloak import ClientCloak, DataRetention, half_labels, null_labels
from fedunlearn.privacy.baselines import (
    FourierFeatures,
    broadcast_problem,
    client_gradient,
    feature_contribution,
    uses_kernel,
)
from fedunlearn.privacy.common import LEFT_OUT, AdamState, adam_step, class_contribution, flatten_users, unflatten_users
from fedunlearn.privacy.stage import at_risk

CLOAK_STATE = "cloak"  # the ClientCloak's arrays, while a defence runs
CLOAK_META = "cloak-meta"  # its flags and Adam step count
CLOAK_SHARED = "cloak-shared"  # AttrCloak-DD: the frozen shared part, for the client's own training loss
TRAINED_STATE = "trained-user"  # defence.compare: the user part as trained, every defence's start


def feature_sums(fields: Any, context: Context, label: int, n_classes: int) -> np.ndarray:
    """D2D-R: this client's one-hot class and the Fourier features of its embedding as defended so
    far, in its class's block (zeros if its class is left out)."""
    current = load_cloak(context).current
    phi = FourierFeatures(len(current), float(fields["scale"]), int(fields["seed"]))
    features = phi(torch.as_tensor(current)[None]).numpy()
    return feature_contribution(features, np.array([label]), n_classes)[0]


def class_sums(fields: Any, seed: int, client_id: str, own_features: np.ndarray, own: Any) -> np.ndarray:
    """This client's part of a secure sum of class sums (or with "counts-only", of counts alone):
    under its own class, or per key of the task's random draws (AttrCloak's null-level
    pseudo-classes, "null-keys"; the covariance brake's (class, half) cells, "split-keys"), drawn
    from `seed` (defence.private_seed). Zeros where its class, or a cell the task does not keep
    ("kept-cells"), is left out (fedunlearn.privacy.cells)."""
    label, n_classes = own_class(fields, own, str(fields["attribute"]))
    cells, n_cells = [label], n_classes
    if "null-keys" in fields:  # AttrCloak's null level: the pseudo-class, not its own
        shares = read_array_field(fields["null-shares"])
        if len(shares) != n_classes:
            raise ValueError(f"{len(shares)} null-level class shares for {n_classes} classes")
        keys = _draw_keys(fields["null-keys"])
        cells = [LEFT_OUT if label == LEFT_OUT else int(null_labels(seed, key, [client_id], shares)[0]) for key in keys]
    elif "split-keys" in fields:  # AttrCloak's covariance brake: its own class in its half, per split
        keys, n_cells = _draw_keys(fields["split-keys"]), 2 * n_classes
        cells = [LEFT_OUT if label == LEFT_OUT else 2 * label + int(half_labels(seed, key, [client_id])[0])
                 for key in keys]  # fmt: skip
    if "kept-cells" in fields:
        kept = json.loads(str(fields["kept-cells"]))
        if not (isinstance(kept, list) and len(kept) == len(cells) and all(
                isinstance(row, list) and len(row) == n_cells for row in kept)):  # fmt: skip
            raise ValueError(f"kept-cells must be {len(cells)} lists of {n_cells} flags; got {kept!r}")
        cells = [cell if cell != LEFT_OUT and kept[i][cell] else LEFT_OUT for i, cell in enumerate(cells)]
    if bool(fields.get("counts-only", False)):
        return np.concatenate([np.eye(n_cells)[cell] if cell != LEFT_OUT else np.zeros(n_cells) for cell in cells])
    return np.concatenate([class_contribution(own_features, cell, n_cells) for cell in cells])


def _draw_keys(field: Any) -> list[int]:
    keys = json.loads(str(field))
    if not isinstance(keys, list) or not all(isinstance(key, int) and key >= 0 for key in keys):
        raise ValueError(f"a draw's keys must be a list of non-negative integers; got {keys!r}")
    return keys


def cloak_products(fields: Any, context: Context, config: Config, data: ClientData, model: SplitModel) -> np.ndarray:
    """AttrCloak step, first half: this client's g_AU (from the broadcast gradients of the attribute
    loss) and g_R, kept for the step; only their three dot products leave, masked."""
    cloak = load_cloak(context)
    step, n_attributes, variant = int(fields["step"]), int(fields["attributes"]), str(fields["variant"])
    gradients = [
        (torch.as_tensor(read_array_field(fields[f"grad-sums-{j}"])),
         torch.as_tensor(read_array_field(fields[f"grad-outers-{j}"])))
        for j in range(n_attributes)
    ]  # fmt: skip
    problem = broadcast_problem(f"attrcloak-{variant}", gradients, cloak.labels, len(cloak.current))
    if problem:
        raise ValueError(problem)
    retention = None
    if variant == "dd" and cloak.defending:
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


def load_cloak(context: Context) -> ClientCloak:
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
    federation, data, model = node_data(config, context)
    if start.keep_trained:
        _keep_trained(context, model, data, config.run.training_seed())
    own = flatten_users(model, [user_part(context, model, data, config.run.training_seed())])[0]
    values = federation.dataset.attributes.iloc[data.index]
    labels = [
        class_index([str(c) for c in cls], start.left_out, values, name)
        for name, cls in zip(start.attributes, start.classes, strict=True)
    ]
    defending = start.defending
    if defending is None:
        own_attributes = federation.dataset.attributes.iloc[[data.index]]
        defending = bool(at_risk(start.attackers, own[None], own_attributes, start.risk_threshold)[0])
    defending = defending and any(label != LEFT_OUT for label in labels)  # left out of every sum: not defended
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
        context.state[TRAINED_STATE] = arrays_to_record(user_part(context, model, data, seed))


def defence_end(msg: Message, context: Context) -> Message:
    """After defence.compare: drop the trained user part, going back to it first if asked."""
    data = setup(msg, context).data
    if bool(msg.content.config_records["defence"]["restore"]):
        context.state[USER_STATE] = context.state.array_records[TRAINED_STATE]
    del context.state[TRAINED_STATE]
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def regularised_step(msg: Message, context: Context) -> Message:
    """D2D-R / U2U-R step: from the broadcast dL/dsums, this client's own gradient and Adam step."""
    torch.set_num_threads(1)
    data = setup(msg, context).data
    method, gradients, weight, lr, n_clients, scale, seed = read_regularised_step(msg.content)
    cloak = load_cloak(context)
    parts = [tuple(torch.as_tensor(part) for part in gradient) for gradient in gradients]
    problem = broadcast_problem(method, parts, cloak.labels, len(cloak.current))
    if problem:
        raise ValueError(problem)
    if cloak.defending:
        current = torch.as_tensor(cloak.current)[None]
        phi = FourierFeatures(current.shape[1], scale, seed) if uses_kernel(method) else None
        labels = [np.array([label]) for label in cloak.labels]
        grad = client_gradient(method, current, torch.as_tensor(cloak.original)[None], labels, parts, weight,
                               n_clients, phi)  # fmt: skip
        cloak.current, cloak.adam = adam_step(cloak.current, grad[0].numpy(), cloak.adam, lr)
        _save_cloak(context, cloak)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def defence_step(msg: Message, context: Context) -> Message:
    """AttrCloak step, second half: the Adam step with the weight the server found from the sums."""
    torch.set_num_threads(1)
    data = setup(msg, context).data
    weight, lr = read_defence_step(msg.content)
    cloak = load_cloak(context)
    cloak.step(weight, lr)
    _save_cloak(context, cloak)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def defence_finish(msg: Message, context: Context) -> Message:
    """AttrCloak ends: the defended embedding becomes this client's user part."""
    config, _, _, _, _, data, model = setup(msg, context)
    user = user_part(context, model, data, config.run.training_seed())
    context.state[USER_STATE] = arrays_to_record(unflatten_users([user], load_cloak(context).current[None])[0])
    _drop_cloak(context)
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)
