"""Flower ClientApp: one client per user. It keeps its user part in `context.state` across rounds
and replies with the shared-parameter update only. The work itself is in fedunlearn.fl.client.

Training comes as "train.fit". Bare "train" is the SecAgg+ protocol (server.secure_sum): the mod
answers its key-exchange stages and calls `secure_contribution` once for this client's vector, which
leaves the node only masked.

The post-training defences run on the client's own embedding (clients.defence).

"query.audit_users" is the exception to "the user part never leaves": the simulation's measurement
oracle (the attribute audit's central view, what the in-process auditor reads directly), sent only
when the run asks for the audit (`audit.enabled`); it is not part of the protocol, and a client
answers it only inside a simulation started by fedunlearn (SIMULATION_ORACLE_ENV), never on a
deployment."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients import defence
from clients.branches import branch_mod, drop_branch
from clients.common import (
    SIMULATION_ORACLE_ENV,
    USER_STATE,
    node_data,
    own_class,
    setup,
    user_part,
    with_own_secret,
)
from clients.messages import (
    AUDIT_USERS,
    CLASS_SUMS,
    CLOAK_PRODUCTS,
    FEATURE_SUMS,
    FOURTH_POWERS,
    KEPT_ROWS,
    LOCAL_AUDIT,
    SECURE_ROWS,
    SECURE_UPDATE,
    arrays_to_record,
    encode_audit_user,
    encode_evaluation,
    encode_identity,
    encode_membership,
    encode_update,
    keep_pending_update,
    pending_update,
    read_array_field,
    read_secure_task,
    told_release,
)
from fedunlearn.config import Config
from fedunlearn.fl.client import local_evaluate, local_membership, local_train
from fedunlearn.fl.faults import inject
from fedunlearn.fl.secure_round import SECURE_UPLOAD, SecureLayout
from fedunlearn.fl.training import resolve_device
from fedunlearn.privacy.attrcloak import fourth_power_contribution, split_into_levels
from fedunlearn.privacy.audit import local_outcome
from fedunlearn.privacy.common import flatten_users
from fedunlearn.privacy.portable import attacker_from_bytes
from fedunlearn.seeding import Stream, client_key


def whoami(msg: Message, context: Context) -> Message:
    data = setup(msg, context).data
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def forget(msg: Message, context: Context) -> Message:
    """The client leaves and asks to be forgotten: its private state is deleted."""
    data = setup(msg, context).data
    if USER_STATE in context.state.array_records:
        del context.state[USER_STATE]
    return Message(encode_identity(data.client_id, data.index), reply_to=msg)


def membership(msg: Message, context: Context) -> Message:
    """Membership inference on this client's own interactions; only the AUC is sent."""
    config, _, shared, _, _, data, model = setup(msg, context)
    user = user_part(context, model, data, config.run.training_seed())
    auc = local_membership(model, data, user, shared, resolve_device(config.run.device))
    return Message(encode_membership(data.client_id, auc), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Train, keep the new user part, send the upload ([faults] may corrupt it, or raise instead)."""
    config, round_number, shared, epochs, ascent, data, model = setup(msg, context)
    user = user_part(context, model, data, config.run.training_seed())
    device = resolve_device(config.run.device)
    release = told_release(msg.content)
    update, user = local_train(model, data, user, shared, config, round_number, device, epochs, ascent, None, release)
    context.state[USER_STATE] = arrays_to_record(user)
    federation = node_data(config, context)[0]
    timeout = config.train.reply_timeout
    update = inject(config.faults, config.run.seed, round_number, update, federation.client_ids, data.n_items, timeout)
    if config.defence.upload == SECURE_UPLOAD:  # the upload leaves only inside the round's secure sum
        keep_pending_update(context.state, update, round_number)
        return Message(encode_identity(data.client_id, data.index), reply_to=msg)
    return Message(encode_update(update), reply_to=msg)


def audit_user(msg: Message, context: Context) -> Message:
    """The simulation's auditor reads this client's user part (a measurement, not the protocol).
    Anywhere but in a simulation fedunlearn started, the client refuses: on a deployment this query
    would hand the server the embedding the protocol keeps on the device."""
    if os.environ.get(SIMULATION_ORACLE_ENV) != "1":
        raise PermissionError(
            f"{AUDIT_USERS} is the simulation's measurement oracle: this client is not in a simulation "
            "started by fedunlearn, so it does not send its user part"
        )
    config, _, _, _, _, data, model = setup(msg, context)
    user = user_part(context, model, data, config.run.training_seed())
    return Message(encode_audit_user(data.client_id, user), reply_to=msg)


def kept_rows_of(fields: dict, n_items: int, config: Config) -> np.ndarray | None:
    """The rows this client's upload may add to the sum: all (None) when the run counts no rows, else
    the server's (n_items,) bool answer to the first sum; without one the client refuses (its rows
    that no other client touched would be summed alone)."""
    if config.defence.secagg_min_clients == 1:
        return None
    if KEPT_ROWS not in fields:
        least = config.defence.secagg_min_clients
        raise ValueError(f"defence.secagg_min_clients = {least} and no {KEPT_ROWS} came with the secure sum: "
                         "refused (a row only this client touched would be summed alone)")  # fmt: skip
    kept = read_array_field(fields[KEPT_ROWS])
    if kept.shape != (n_items,) or kept.dtype != np.bool_:
        raise ValueError(f"{KEPT_ROWS} must be {n_items} booleans; got {kept.dtype} {kept.shape}")
    return kept


SECURE_CALLS = "secure-calls"  # the client's state: secure sums answered so far (seed_secure_rounding)


def secure_contribution(msg: Message, context: Context) -> Message:
    """This client's vector for the secure task the server asked for, computed from what only it
    holds (its user part, its attribute value). The mod quantises and masks it before it leaves."""
    fields = recorddict_to_fitins(msg.content, keep_input=True).config
    config, task, bound = read_secure_task(fields)
    config = with_own_secret(config, context)
    federation, data, model = node_data(config, context)
    if task in (SECURE_ROWS, SECURE_UPDATE):
        update = pending_update(context.state, int(fields["round"]), take=task == SECURE_UPDATE)
        shapes = {key: value.shape for key, value in model.init_shared(np.random.default_rng(0)).items()}
        layout = SecureLayout.of(model, shapes, int(fields["max-examples"]), config.defence.secagg_bound,
                                 float(fields["epochs"]), config.train.batch_size)  # fmt: skip
        if task == SECURE_ROWS:
            vector = layout.touched_rows(update)
        else:
            vector = layout.contribution(update, kept_rows_of(fields, layout.n_items, config))
    elif task == CLOAK_PRODUCTS:
        vector = defence.cloak_products(fields, context, config, data, model)
    else:
        attribute = str(fields["attribute"])
        own = federation.dataset.attributes.iloc[data.index]
        own_value = str(own[attribute])
        if task == LOCAL_AUDIT:
            own_features = flatten_users(model, [user_part(context, model, data, config.run.training_seed())])[0]
            vector = local_outcome(attacker_from_bytes(bytes(fields["attacker"])), own_features, own_value)
        elif task == CLASS_SUMS:
            if bool(fields.get("defence", False)):  # during AttrCloak: the embedding as defended so far
                own_features = defence.load_cloak(context).current
            else:
                own_features = flatten_users(model, [user_part(context, model, data, config.run.training_seed())])[0]
            vector = defence.class_sums(fields, config.defence_seed(), data.client_id, own_features, own)
        elif task == FEATURE_SUMS:
            vector = defence.feature_sums(fields, context, *own_class(fields, own, attribute))
        elif task == FOURTH_POWERS:
            means, global_mean = read_array_field(fields["means"]), read_array_field(fields["global-mean"])
            label, n_classes = own_class(fields, own, attribute)
            levels = read_array_field(fields["levels"])
            if levels.ndim != 1 or not len(levels) or not np.all(np.isfinite(levels)) or np.any(np.diff(levels) <= 0):
                raise ValueError("the fourth powers' levels must be a finite increasing list of tops")
            original = defence.load_cloak(context).original
            values = fourth_power_contribution(original, label, means, global_mean, n_classes)
            if values.max() > levels[-1]:  # the split would clip it silently, below the bound check; the value
                # itself is not told: from its maximum under chosen means a server would rebuild the embedding
                raise ValueError(f"a fourth power beyond the top level {levels[-1]:.3g}: raise the levels")
            vector = split_into_levels(values, levels).ravel()
        else:
            raise ValueError(f"unknown secure task {task!r}")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"a {task} contribution is not finite (NaN or inf): this client's state diverged")
    if not np.all(np.abs(vector) <= bound):  # SecAgg+ would clip silently; the value itself is not told
        raise ValueError(f"a {task} contribution lies outside the secure sum's bound +-{bound}: ask for a larger one")
    seed_secure_rounding(fields, config.run.seed, data.client_id, context)
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics={})
    return Message(fitres_to_recorddict(reply, keep_input=False), reply_to=msg)


def seed_secure_rounding(fields: dict, seed: int, client_id: str, context: Context) -> None:
    """SecAgg+ rounds each value of the vector up or down at random (flwr's `quantize`, run by the mod
    right after this handler returns), drawing from numpy's global generator: unseeded, two runs of
    one config summed different numbers (a defended embedding 3e-5 apart, an audit AUC 1.3e-3, a
    review). Seeded here from the run seed, the client, the task and how many secure sums this
    client has answered (an AttrCloak step's task repeats step after step: its rounding must not),
    so a run repeats; the rounding only has to be unbiased and independent, not secret (the masks
    hide each value)."""
    record = context.state.config_records.setdefault(SECURE_CALLS, ConfigRecord({"count": 0}))
    record["count"] = calls = int(record["count"]) + 1
    task = hashlib.sha256(repr(sorted(fields.items())).encode()).digest()
    words = [seed, int(Stream.SECURE_ROUNDING), client_key(client_id), int.from_bytes(task[:8], "little"), calls]
    np.random.seed(np.random.SeedSequence(words).generate_state(4))  # any run.seed, however large


def evaluate(msg: Message, context: Context) -> Message:
    config, _, shared, _, _, data, model = setup(msg, context)
    user = user_part(context, model, data, config.run.training_seed())
    evaluation = local_evaluate(model, data, user, shared, config, resolve_device(config.run.device))
    return Message(encode_evaluation(evaluation), reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp with every handler above, each able to work on a branch of the state (clients.branches)."""
    client = ClientApp(mods=[branch_mod])
    client.query("whoami")(whoami)
    client.query("forget")(forget)
    client.query("membership")(membership)
    client.query("defence_start")(defence.defence_start)
    client.query("defence_step")(defence.defence_step)
    client.query("defence_finish")(defence.defence_finish)
    client.query("regularised_step")(defence.regularised_step)
    client.query("defence_end")(defence.defence_end)
    client.query("audit_users")(audit_user)
    client.query("drop_branch")(drop_branch)
    client.train("fit")(train)
    client.train(mods=[secaggplus_mod])(secure_contribution)
    client.evaluate()(evaluate)
    return client


app = make_client_app()
