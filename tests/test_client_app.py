"""The Flower ClientApp called directly (no Ray): state persistence and what a reply may carry."""

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from helpers import TINY

from clients.app import app
from clients.common import SIMULATION_ORACLE_ENV, USER_STATE
from clients.messages import (
    AUDIT_USERS,
    TRAIN,
    WHOAMI,
    decode_audit_user,
    decode_evaluation,
    decode_identity,
    decode_update,
    instruction,
    record_to_arrays,
)
from fedunlearn.config import derive, load_config, with_private_seed
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.federation import build_federation


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; outside a run, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


SMALL = TINY


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=99, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def _send(kind: str, content: RecordDict, context: Context) -> Message:
    reply = app(Message(content, 99, kind), context)
    assert not reply.has_error(), reply.error
    return reply


def test_client_keeps_its_user_part_in_state_and_matches_the_inprocess_runner():
    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    pool = InProcessPool(config, federation)
    shared = pool.model.init_shared(np.random.default_rng(5))
    context = _context(3)

    identity = decode_identity(_send(WHOAMI, instruction(config), context).content)
    assert identity == (federation.client_ids[3], 3)
    assert USER_STATE not in context.state.array_records  # whoami trains nothing

    for round_number in (1, 2):
        reply = _send(TRAIN, instruction(config, round_number, shared), context)
        expected = pool.train(round_number, [3], shared, lambda _: None)[0].value
        update = decode_update(reply.content)
        assert update.client_id == federation.client_ids[3]
        np.testing.assert_array_equal(update.item_ids, expected.item_ids)
        np.testing.assert_array_equal(update.rows["item_emb"], expected.rows["item_emb"])
        kept = record_to_arrays(context.state.array_records[USER_STATE])
        np.testing.assert_array_equal(kept["user_emb"], pool.user_state[3]["user_emb"])
        assert set(reply.content.keys()) == {"update", "metrics", "meta"}
        # exactly the shared part's arrays: a user part under any name would add a key
        shared_keys = {"item_ids", *(f"rows.{key}" for key in expected.rows)} | {f"dense.{k}" for k in expected.dense}
        assert set(reply.content.array_records["update"].keys()) == shared_keys

    evaluation = decode_evaluation(_send(MessageType.EVALUATE, instruction(config, 0, shared), context).content)
    assert evaluation == pool.evaluate([3], shared, lambda _: None)[0].value


def test_outside_fedunlearns_simulation_a_client_refuses_the_audit_oracle(monkeypatch):
    # a SuperNode on a deployment: the process was not started by fedunlearn's simulation runner
    monkeypatch.delenv(SIMULATION_ORACLE_ENV, raising=False)
    config = load_config(None, SMALL)
    context = _context(4)
    _send(TRAIN, instruction(config, 1, InProcessPool(config, build_federation(config.data, 0)).model.init_shared(
        np.random.default_rng(5))), context)  # fmt: skip
    with pytest.raises(PermissionError, match="simulation's measurement oracle"):  # Flower replies with the error
        app(Message(instruction(config), 99, AUDIT_USERS), context)
    monkeypatch.setenv(SIMULATION_ORACLE_ENV, "yes")  # only the runner's exact marker opens it
    with pytest.raises(PermissionError):
        app(Message(instruction(config), 99, AUDIT_USERS), context)
    monkeypatch.setenv(SIMULATION_ORACLE_ENV, "1")
    assert set(app(Message(instruction(config), 99, AUDIT_USERS), context).content.keys()) == {"user", "meta"}


def test_the_audit_query_hands_the_auditor_the_user_part_the_client_holds(monkeypatch):
    monkeypatch.setenv(SIMULATION_ORACLE_ENV, "1")  # as server.simulation sets it for its clients
    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    pool = InProcessPool(config, federation)
    context = _context(4)
    client_id, fresh = decode_audit_user(_send(AUDIT_USERS, instruction(config), context).content)
    assert client_id == federation.client_ids[4]
    np.testing.assert_array_equal(fresh["user_emb"], pool.user(4)["user_emb"])  # not trained yet: the initial one
    shared = pool.model.init_shared(np.random.default_rng(5))
    _send(TRAIN, instruction(config, 1, shared), context)
    pool.train(1, [4], shared, lambda _: None)
    reply = _send(AUDIT_USERS, instruction(config), context)
    assert set(reply.content.keys()) == {"user", "meta"}
    np.testing.assert_array_equal(decode_audit_user(reply.content)[1]["user_emb"], pool.user(4)["user_emb"])


def test_a_client_validates_the_runs_config_once_and_holds_it_frozen():
    from clients.messages import read_instruction
    from fedunlearn.errors import FedUnlearnError

    config = load_config(None, [*SMALL, "train.lr=0.003"])
    first, second = (read_instruction(instruction(config, round_number))[0] for round_number in (1, 2))
    assert first is second and first == config  # decoded once, not once per message
    with pytest.raises(FedUnlearnError, match="frozen"):
        first.train.lr = 1.0  # shared between messages, so it must not be changeable


def test_a_client_refuses_malformed_shared_parameters_and_epochs():
    """A client indexed the server's tables blindly: a table 50 rows short was an IndexError deep in
    training, 5 rows too many trained silently, negative epochs a numpy error."""
    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    shared = InProcessPool(config, federation).model.init_shared(np.random.default_rng(5))
    key = next(iter(shared))
    broken = [
        ({**shared, key: shared[key][:-3]}, "do not fit this run's model"),
        ({**shared, key: np.vstack([shared[key], shared[key][:5]])}, "do not fit this run's model"),
        ({k: v for k, v in shared.items() if k != key}, "do not fit this run's model"),
        ({**shared, key: np.where(np.eye(*shared[key].shape, dtype=bool), np.nan, shared[key])}, "NaN or inf"),
        ({**shared, key: shared[key].astype(np.int64)}, "expected floats"),
    ]
    for sent, message in broken:  # Flower replies with the error
        with pytest.raises(ValueError, match=message):
            app(Message(instruction(config, 1, sent), 99, TRAIN), _context(3))
    with pytest.raises(ValueError, match="asked for -3.0 epochs"):
        app(Message(instruction(config, 1, shared, epochs=-3.0), 99, TRAIN), _context(3))


def test_the_promoted_items_rank_is_sent_whoever_holds_it_and_for_one_item_per_run():
    """Its target rank was -1 exactly when the client held the item, so a server sweeping
    unlearn.target_item over the catalogue read the client's interaction list off the replies."""
    from fedunlearn.config import derive

    config = load_config(None, SMALL)
    federation = build_federation(config.data, config.run.seed)
    shared = InProcessPool(config, federation).model.init_shared(np.random.default_rng(5))
    own = int(federation.client(3).train_items[0])
    context = _context(3)
    ranked = derive(config, {"unlearn.target_item": own})
    reply = _send(MessageType.EVALUATE, instruction(ranked, 0, shared), context)
    assert decode_evaluation(reply.content).target_rank >= 0  # its own item is ranked like any other
    other = derive(config, {"unlearn.target_item": own + 1})
    with pytest.raises(ValueError, match="one promoted item per run"):
        app(Message(instruction(other, 0, shared), 99, MessageType.EVALUATE), context)


def test_a_branch_cannot_lift_the_pin_on_the_promoted_item():
    """The pin lived in whatever state the handler got: a server forked a branch per item, asked
    for that item's rank there and dropped the branch, reading the client's ranking of every item."""
    from clients.messages import DROP_BRANCH, encode_drop_branch
    from fedunlearn.config import derive

    config = load_config(None, SMALL)  # no promoted item: the run pins "none"
    shared = InProcessPool(config, build_federation(config.data, 0)).model.init_shared(np.random.default_rng(5))
    context = _context(3)
    _send(WHOAMI, instruction(config), context)
    with pytest.raises(ValueError, match="one promoted item per run"):
        app(Message(instruction(derive(config, {"unlearn.target_item": 0}), 0, shared, branch="b0"), 99,
                    MessageType.EVALUATE), context)  # fmt: skip
    fresh = _context(3)  # the first message on a branch pins the run
    for item, branch in ((0, "b0"), (1, "b1")):
        asked = instruction(derive(config, {"unlearn.target_item": item}), 0, shared, branch=branch)
        if item == 0:
            _send(MessageType.EVALUATE, asked, fresh)
            _send(DROP_BRANCH, encode_drop_branch(config, branch), fresh)
        else:
            with pytest.raises(ValueError, match="one promoted item per run"):
                app(Message(asked, 99, MessageType.EVALUATE), fresh)


def test_no_message_names_the_clients_who_leave_never_join_or_attack():
    """Every message carried the whole config: the drop schedule, data.exclude_clients and the
    poisoning attackers, so every client (each message after an event included) read who left."""
    import json

    from clients.messages import SECURE_UPDATE, read_instruction, secure_task, told_attacker

    config = load_config(None, TINY + ['unlearn.drop="3@2;4,5@3"', 'data.exclude_clients=["7"]', "unlearn.poison=true"])
    config = derive(config, {"unlearn.attackers": ["3"]})
    for content in (instruction(config, 2), instruction(config, 2, attacker=True)):
        carried = json.loads(content.config_records["task"]["config"])
        assert carried["unlearn"]["drop"] == carried["unlearn"]["drop_random"] == ""
        assert carried["unlearn"]["attackers"] == [] and carried["data"]["exclude_clients"] == []
        told, *_ = read_instruction(content)
        assert told.unlearn.poison and told.train == config.train  # the rest as the server's
    assert [told_attacker(instruction(config, 2, attacker=flag)) for flag in (False, True)] == [False, True]
    secure = json.loads(secure_task(config, SECURE_UPDATE)["config"])
    assert secure["unlearn"]["drop"] == "" and secure["unlearn"]["attackers"] == []


def test_no_message_names_the_clients_who_defend_their_upload():
    """Under defence.clients = "listed" every message carried defence.client_ids: each client read
    which others defend (a leaving one included). Now each is told only its own part."""
    import json

    from clients.messages import own_part, read_instruction
    from fedunlearn.fl.client import defends_upload

    config = load_config(None, TINY + ["defence.upload=ldp", "defence.clients=listed", 'defence.client_ids=["3","7"]'])
    assert [own_part(config, client) for client in ("3", "4")] == [(False, True), (False, False)]
    for defends, upload in ((True, "ldp"), (False, "none")):
        carried = json.loads(instruction(config, 2, defends=defends).config_records["task"]["config"])
        assert carried["defence"]["client_ids"] == [] and carried["defence"]["upload"] == upload
        told, *_ = read_instruction(instruction(config, 2, defends=defends))
        assert [defends_upload(told, client) for client in ("3", "4")] == [defends, defends]
    everyone = load_config(None, TINY + ["defence.upload=ldp", 'defence.client_ids=["3"]'])
    assert own_part(everyone, "3") == (False, False)  # not listed: the same message for all
    assert json.loads(instruction(everyone, 2).config_records["task"]["config"])["defence"]["client_ids"] == []


def test_secure_rounding_draws_are_seeded_by_the_run_the_client_and_the_task():
    """flwr's SecAgg+ mod rounds the handler's vector stochastically with numpy's global generator
    right after the handler returns: unseeded, two runs of one config summed different numbers."""
    import json

    from flwr.common import FitIns, Parameters
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from clients.app import secure_contribution
    from clients.messages import BOUND, CLASS_SUMS, secure_task

    def rounded(partition: int, classes: list[str], context: Context | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        config = load_config(None, SMALL + [f"run.seed={seed}"])
        fields = secure_task(config, CLASS_SUMS, attribute="gender", classes=json.dumps(classes))
        fields |= {"left-out": "{}", BOUND: 1e3}
        content = fitins_to_recorddict(FitIns(Parameters([], ""), fields), keep_input=True)
        if context is None:
            context = _context(partition)
            _send(WHOAMI, instruction(config), context)
        reply = secure_contribution(Message(content, 99, MessageType.TRAIN), context)
        vector = record_to_arrays(reply.content.array_records["fitres.parameters"])["0"]
        return vector, quantize([vector], 1e3, 2**20)[0]

    state = np.random.get_state()
    try:
        vector, first = rounded(3, ["F", "M"])
        np.random.seed(12345)  # whatever ran in this process before
        context = _context(3)
        _send(WHOAMI, instruction(load_config(None, SMALL)), context)
        again, second = rounded(3, ["F", "M"], context)
        _, next_step = rounded(3, ["F", "M"], context)  # an AttrCloak step's task repeats: its rounding must not
        _, other_client = rounded(4, ["F", "M"])
        _, other_task = rounded(3, ["M", "F"])
        rounded(3, ["F", "M"], seed=2**40)  # any run.seed numpy's generator cannot take as it is
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(vector, again)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, next_step) and not np.array_equal(first, other_client)
    assert not np.array_equal(np.sort(first), np.sort(other_task))


def test_a_client_with_its_own_noise_secret_draws_ldp_noise_the_server_cannot_draw_again():
    """Found by an independent check: LDP noise was seeded by run.seed and the client id, both known to
    the server (it sends the config), which rebuilt the noise and took it off to 3e-7. A SuperNode's
    `noise-secret` now seeds its client's own draws; a config cannot carry one."""
    config = load_config(None, [*SMALL, "defence.upload=ldp"])
    federation = build_federation(config.data, config.run.seed)
    shared = InProcessPool(config, federation).model.init_shared(np.random.default_rng(5))
    context = Context(run_id=1, node_id=99, node_config={"partition-id": 3, "noise-secret": 12345},
                      state=RecordDict(), run_config={})  # fmt: skip
    sent = decode_update(_send(TRAIN, instruction(config, 1, shared), context).content)
    private = InProcessPool(with_private_seed(config, 12345), federation).train(1, [3], shared, lambda _: None)
    public = InProcessPool(config, federation).train(1, [3], shared, lambda _: None)
    np.testing.assert_array_equal(sent.rows["item_emb"], private[0].value.rows["item_emb"])  # the secret seeds it
    assert not np.allclose(sent.rows["item_emb"], public[0].value.rows["item_emb"], atol=0.1)  # run.seed does not
    with pytest.raises(FedUnlearnError, match="never in a config"):
        load_config(None, ["defence.private_seed=12345"])


def test_a_node_secret_as_large_as_server_deploy_draws_seeds_the_pseudo_classes_and_halves():
    """Found by a review: a secret above ~1.8e13 overflowed client_uniforms' uint64 arithmetic, so
    AttrCloak's null level and covariance brake raised on every deployed client (the test used 12345)."""
    from fedunlearn.privacy.attrcloak import half_labels, null_labels

    secret = 2**63 - 1
    labels = [null_labels(secret, key, ["7", "8", "9"], np.array([0.5, 0.5])) for key in range(16)]
    halves = [half_labels(secret, key, ["7", "8", "9"]) for key in range(16)]
    assert {int(v) for draw in labels for v in draw} == {0, 1} and {int(v) for h in halves for v in h} == {0, 1}
