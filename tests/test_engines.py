"""The Flower path and the in-process runner run the same functions and must give the same numbers."""

import numpy as np
import pytest
from helpers import TINY, assert_no_user_part, run_as_the_runner_does

from clients.messages import AUDIT_USERS
from fedunlearn.config import derive, load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server

SMALL = TINY + [
    "train.rounds=2",
    "eval.every=1",
    "train.fraction=0.5",
]


def run_inprocess(overrides):
    config = load_config(None, SMALL + overrides)
    federation = build_federation(config.data, config.run.seed)
    pool = InProcessPool(config, federation)
    server = federated_server(config, federation, pool, Progress(1, False))
    return run_as_the_runner_does(server, pool), pool


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_same_seed_same_numbers_and_other_seed_other_numbers(model):
    first, _ = run_inprocess([f"model.name={model}"])
    second, _ = run_inprocess([f"model.name={model}"])
    third, _ = run_inprocess([f"model.name={model}", "run.seed=1"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(first.rounds) == strip(second.rounds)
    for key in first.shared:
        np.testing.assert_array_equal(first.shared[key], second.shared[key])
    assert any(not np.array_equal(first.shared[k], third.shared[k]) for k in first.shared)


@pytest.mark.flower
@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_flower_path_equals_inprocess_runner_and_never_uploads_a_user_embedding(model):
    from server.simulation import run_flower

    overrides = [f"model.name={model}", "run.engine=flower"]
    expected, pool = run_inprocess(overrides)
    config = load_config(None, SMALL + overrides)
    result, flower_pool = run_flower(config, keep_replies=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(result.rounds) == strip(expected.rounds)
    for key in expected.shared:
        np.testing.assert_array_equal(result.shared[key], expected.shared[key])

    # every reply any client sent, searched for any user embedding (as held at the end and as initialised)
    from fedunlearn.fl.client import init_user

    user_vectors = [v for state in pool.user_state.values() for v in state.values()]
    initial = (init_user(pool.model, config.run.seed, client) for client in pool.federation.client_ids)
    user_vectors += [v for state in initial for v in state.values()]
    replies = flower_pool.replies_seen
    assert len(replies) == 10 + 2 * 5 + 2 * 10  # whoami, 2 rounds x 5 trainers, 2 evaluations x 10
    # the audit's oracle (query.audit_users, tests/test_flower_audit.py) is the one exception, asked only by an audit
    assert AUDIT_USERS not in flower_pool.reply_types
    assert_no_user_part(replies, user_vectors)


@pytest.mark.flower
def test_a_listed_upload_defence_on_flower_gives_the_inprocess_model():
    """Each Flower client is told only whether it defends (clients.messages.told, no list of who
    does): the listed clients noise their uploads, the others do not, as in-process."""
    from server.simulation import run_flower

    ids = build_federation(load_config(None, SMALL).data, 0).client_ids
    overrides = ["run.engine=flower", "defence.upload=ldp", "defence.clients=listed"]
    overrides.append(f"defence.client_ids={ids[::3]}".replace("'", '"'))
    expected, _ = run_inprocess(overrides)
    plain, _ = run_inprocess([])
    assert any(not np.array_equal(expected.shared[k], plain.shared[k]) for k in plain.shared)  # the noise acts
    result, _ = run_flower(load_config(None, SMALL + overrides))
    for key in expected.shared:
        np.testing.assert_array_equal(result.shared[key], expected.shared[key])


def test_client_sampling_does_not_depend_on_who_else_is_in_the_federation():
    from fedunlearn.fl.rounds import sample_clients

    ids = [str(i) for i in range(1, 401)]
    full = {ids[i] for i in sample_clients(3, 7, ids, 0.25)}
    assert 60 < len(full) < 140  # about a quarter
    fewer = [c for c in ids if c not in {"5", "17", "200"}]
    assert {fewer[i] for i in sample_clients(3, 7, fewer, 0.25)} == full - {"5", "17", "200"}
    assert {ids[i] for i in sample_clients(3, 8, ids, 0.25)} != full  # a new round, a new sample
    assert sample_clients(3, 7, ids, 1.0) == list(range(400))


@pytest.mark.flower
def test_unlearning_runs_its_calibration_through_flower_with_the_same_numbers(tmp_path, capfd):
    from fedunlearn.fl.history import HistoryPolicy, HistoryStore
    from server.simulation import run_flower

    """The leaving client poisons: each message names no other client (clients.messages.told), and
    an attacker learns its own part from its message alone, so it poisons on Flower as in-process."""
    from fedunlearn.runs.runner import schedule_and_history

    overrides = ["unlearn.method=federaser", "train.rounds=5", "eval.every=5", "train.fraction=1"]
    overrides.append("unlearn.poison=true")
    config = load_config(None, SMALL + overrides)
    federation = build_federation(config.data, config.run.seed)
    config = derive(config, {"unlearn.drop": f"{federation.client_ids[2]}@4"})
    config, schedule, _ = schedule_and_history(config, federation, tmp_path)
    assert config.unlearn.attackers == [federation.client_ids[2]]
    pool = InProcessPool(config, federation)
    history = HistoryStore(tmp_path / "a.sqlite", HistoryPolicy())
    args = (config, federation, pool, Progress(1, False), history, schedule)
    expected = run_as_the_runner_does(federated_server(*args), pool)
    result, _ = run_flower(config, history=HistoryStore(tmp_path / "b.sqlite", HistoryPolicy()), schedule=schedule)
    for key in expected.unlearned:
        np.testing.assert_array_equal(result.unlearned[key], expected.unlearned[key])
    printed = capfd.readouterr()
    assert "DEPRECATED FEATURE" not in printed.err and "\x1b[" not in printed.err  # no banner, no colour codes
    for key in expected.shared:
        np.testing.assert_array_equal(result.shared[key], expected.shared[key])
    assert result.events[0]["after"] == expected.events[0]["after"]
    assert result.events[0]["MIA_AUC"] == expected.events[0]["MIA_AUC"]
    assert result.events[0]["client_epochs"] == expected.events[0]["client_epochs"]
