"""`unlearn.compare` on Flower: every method tried on a branch of the clients' state gives the
in-process table, and the run itself is untouched."""

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message, RecordDict
from helpers import TINY, assert_no_user_part, run_as_the_runner_does

from clients.common import PINNED, USER_STATE
from clients.messages import (
    AUDIT_USERS,
    DROP_BRANCH,
    FORGET,
    TRAIN,
    decode_update,
    encode_drop_branch,
    instruction,
    record_to_arrays,
)
from fedunlearn.config import load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from fedunlearn.unlearning.methods import history_policy
from fedunlearn.unlearning.registry import METHODS

COMPARE = TINY + ["train.rounds=5", "eval.every=5", "train.fraction=0.5", "unlearn.method=federaser"]


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; outside a run, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _send(kind, content, context):
    from clients.app import app

    reply = app(Message(content, 99, kind), context)
    assert not reply.has_error(), reply.error
    return reply


def _flat(update):
    """An update's touched item ids and rows, as one vector."""
    return np.concatenate([update.item_ids.astype(np.float32)] + [v.ravel() for v in update.rows.values()])


def _train(config, shared, context, branch=""):
    return _flat(decode_update(_send(TRAIN, instruction(config, 2, shared, branch=branch), context).content))


def test_a_branch_is_a_lazy_copy_of_the_clients_state_and_never_touches_it(task_identity):
    config = load_config(None, TINY)
    federation = build_federation(config.data, config.run.seed)
    shared = InProcessPool(config, federation).model.init_shared(np.random.default_rng(5))
    context = Context(run_id=1, node_id=99, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    _send(TRAIN, instruction(config, 1, shared), context)
    own = record_to_arrays(context.state.array_records[USER_STATE])

    on_a = _train(config, shared, context, "a")
    for key, value in record_to_arrays(context.state.array_records[USER_STATE]).items():
        np.testing.assert_array_equal(value, own[key])  # the branch trained, the client's own state did not move
    np.testing.assert_array_equal(on_a, _train(config, shared, context))  # it started from a copy of that state
    _send(FORGET, instruction(config, branch="b"), context)
    fresh = InProcessPool(config, federation).train(2, [3], shared, lambda _: None)[0].value
    np.testing.assert_array_equal(_train(config, shared, context, "b"), _flat(fresh))  # forgotten on b: afresh

    for branch in ("a", "b"):
        _send(DROP_BRANCH, encode_drop_branch(config, branch), context)
    assert sorted(context.state.keys()) == sorted([PINNED, USER_STATE])  # the run's own records only


def _inprocess(config, federation, schedule, history_path):
    """The in-process run, and every pool its comparison forked (their clients' final user parts)."""
    pool = InProcessPool(config, federation)
    forks = []
    fork = pool.fork
    pool.fork = lambda: forks.append(fork()) or forks[-1]
    history = HistoryStore(history_path, history_policy(config.unlearn))
    args = (config, federation, pool, Progress(1, False), history, schedule)
    return run_as_the_runner_does(federated_server(*args), pool), [pool, *forks]


@pytest.mark.flower
def test_flower_compare_gives_the_inprocess_table_and_leaves_the_run_untouched(tmp_path):
    from server.simulation import run_flower

    config = load_config(None, COMPARE + ["unlearn.compare=true"])
    federation = build_federation(config.data, config.run.seed)
    schedule = {4: [federation.client_ids[2]]}  # FedEraser calibrates at checkpoint 3
    expected, pools = _inprocess(config, federation, schedule, tmp_path / "a.sqlite")
    plain_config = load_config(None, COMPARE)
    plain, _ = _inprocess(plain_config, federation, schedule, tmp_path / "b.sqlite")
    history = HistoryStore(tmp_path / "c.sqlite", history_policy(config.unlearn))
    result, flower_pool = run_flower(config, keep_replies=True, history=history, schedule=schedule)

    assert [row["method"] for row in result.comparison] == list(METHODS)
    timing = {"unlearn_seconds", "speedup_time"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    # exactly equal, NaN (no speedup for a method that trained nothing) included
    pd.testing.assert_frame_equal(
        pd.DataFrame(strip(result.comparison)), pd.DataFrame(strip(expected.comparison)), check_exact=True
    )
    trained = {row["method"] for row in result.comparison if row["client_epochs"] > 0}
    assert trained == {"retrain", "federaser", "fru", "ascent"}  # each trained clients on its branch
    for key in plain.shared:  # the comparison ran on branches: the run equals one without it
        np.testing.assert_array_equal(result.shared[key], plain.shared[key])
    assert result.events[0]["after"] == plain.events[0]["after"]

    assert DROP_BRANCH in flower_pool.reply_types and AUDIT_USERS not in flower_pool.reply_types
    user_vectors = [v for pool in pools for state in pool.user_state.values() for v in state.values()]
    assert_no_user_part(flower_pool.replies_seen, user_vectors)
