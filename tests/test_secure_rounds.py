"""Secure aggregation of training rounds (`defence.upload = "secagg"`, fl/secure_round.py): the
server's step from the sum of the clients' contributions is the plain aggregation's; a run trains
the same model on every engine; the server holds nothing of a single upload, so the audit's upload
attacks read every client alike (chance); whatever needs single uploads is refused."""

import json

import numpy as np
import pandas as pd
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from helpers import TINY, run_cli, simulate_then

from clients.messages import TRAIN
from fedunlearn.config import derive, load_config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.aggregation import aggregate_delta
from fedunlearn.fl.comparison import initial_key
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.secure_round import LOSS_CAP, SecureLayout
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models import build_model
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from fedunlearn.runs.runner import schedule_and_history
from fedunlearn.unlearning.retrain import retrain_seed
from server.secure_sum import quantization_range, resolution

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

PROTOCOL_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS,
                 Key.NODE_ID_LIST, Key.SHARE_LIST}  # fmt: skip
SECURE = TINY + ["train.rounds=3", "eval.every=3", "defence.upload=secagg", "audit.attackers=[mlp]"]


def _updates(model, shared, rng, n=5):
    updates = []
    for c in range(n):
        items = np.sort(rng.choice(model.n_items, size=int(rng.integers(1, 12)), replace=False))
        width = {key: shared[key].shape[1] for key in model.row_keys}
        rows = {key: rng.normal(0, 0.1, (len(items), d)).astype(np.float32) for key, d in width.items()}
        dense = {key: rng.normal(0, 0.1, value.shape).astype(np.float32) for key, value in shared.items()
                 if key not in model.row_keys}  # fmt: skip
        updates.append(ClientUpdate(f"c{c}", int(rng.integers(1, 30)), items, rows, dense, 0.5, 1.0, 1))
    return updates


@pytest.mark.parametrize("name", ["mf", "ncf"])
def test_the_step_from_the_secure_sum_is_the_plain_aggregations(name):
    config = load_config(None, TINY + [f"model.name={name}"])
    model = build_model(config.model, 40)
    shared = model.init_shared(np.random.default_rng(0))
    updates = _updates(model, shared, np.random.default_rng(1))
    layout = SecureLayout.of(model, {k: v.shape for k, v in shared.items()}, 30, 1.0, 1.0, 64)
    total = np.zeros(layout.size)
    for update in updates:
        layout.add(total, update)
    summed = layout.total(total, len(updates))
    secure = summed.delta(shared, 3.0, 1.0)
    plain = aggregate_delta(model, shared, updates, 3.0, 1.0)
    for key in shared:
        np.testing.assert_allclose(secure[key], plain[key], rtol=1e-12, atol=1e-15)
    assert summed.count == 5 and summed.loss == pytest.approx(5 * 0.5) and summed.steps == pytest.approx(5)
    assert np.all(np.abs(layout.contribution(updates[0])) <= 1)  # the range SecAgg+ quantises


def test_a_contribution_secure_aggregation_would_clip_is_refused_with_the_setting_to_change():
    config = load_config(None, TINY)
    model = build_model(config.model, 40)
    shared = model.init_shared(np.random.default_rng(0))
    layout = SecureLayout.of(model, {k: v.shape for k, v in shared.items()}, 30, 0.05, 1.0, 64)
    (update,) = _updates(model, shared, np.random.default_rng(1), n=1)
    total = np.zeros(layout.size)
    with pytest.raises(FedUnlearnError, match="by more than defence.secagg_bound = 0.05.*raise defence.secagg_bound"
                       ) as refused:  # fmt: skip
        layout.add(total, update)
    assert not total.any()  # refused before anything was added
    largest = max(float(np.abs(value).max()) for value in update.rows.values())
    assert f"{largest:.3g}" not in str(refused.value)  # a server choosing the bound would read the value off it
    update.rows = {key: value * 0 for key, value in update.rows.items()}
    update.dense = {key: value * 0 for key, value in update.dense.items()}
    update.loss = LOSS_CAP * 2
    with pytest.raises(FedUnlearnError, match="training diverged"):
        layout.add(total, update)


@pytest.mark.parametrize("engine", ["inprocess", "batched"])
def test_a_secure_round_never_sums_one_client(tmp_path, engine, capsys):
    """A sum over one client is its upload (the audit's upload view read it exactly), and Retrain's
    replay of a round without a removed client could leave one: under secure aggregation every round
    samples at least two clients (the lowest draws join), and a round left with one is refused."""
    from fedunlearn.fl.rounds import sample_clients
    from fedunlearn.fl.secure_round import require_secure_quorum

    ids = [str(i) for i in range(40)]
    assert len(sample_clients(0, 3, ids, 0.001)) == 1 and len(sample_clients(0, 3, ids, 0.001, least=2)) == 2
    lowest = sample_clients(0, 3, ids, 0.001, least=2)
    assert sample_clients(0, 3, ids, 0.001)[0] in lowest  # the plain rule's one client is among them
    settings = [*TINY, "data.synthetic_users=40", "train.rounds=6", "defence.upload=secagg", "train.fraction=0.1"]
    run_cli([*settings, "unlearn.drop=7@5", "unlearn.method=retrain"], engine, tmp_path / "run")  # exit 0
    with pytest.raises(FedUnlearnError, match="round 4: 1 client\\(s\\) trained, and a secure sum needs at least 2"):
        require_secure_quorum(1, 4)
    with pytest.raises(FedUnlearnError, match="round 2: 9 clients trained and defence.secagg_min_clients = 10: no"):
        require_secure_quorum(9, 2, 10)
    require_secure_quorum(10, 2, 10)  # enough: some rows may reach 10
    from fedunlearn.cli import main

    # about 4 of the 40 clients drawn a round: the lowest draws join up to defence.secagg_min_clients
    run_cli([*settings, "train.rounds=3", "defence.secagg_min_clients=5", "unlearn.drop=7@3", "unlearn.method=retrain"],
            engine, tmp_path / "topped")  # fmt: skip
    sets = [*TINY, "train.rounds=2", "defence.upload=secagg", "defence.secagg_min_clients=11"]  # 10 clients in all
    args = ["run", "--quiet", "--engine", engine, "--out", str(tmp_path / "frozen")]
    args += [part for setting in sets for part in ("--set", setting)]
    assert main(args) != 0
    assert "round 1: 10 clients trained and defence.secagg_min_clients = 11" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, named",
    [
        ("unlearn.method=federaser", "unlearn.method = 'federaser'"),
        ("train.aggregation=median", "train.aggregation"),
        ("faults.share=0.2", "faults.share"),
    ],
)
def test_what_needs_single_uploads_is_refused_under_secure_aggregation(setting, named):
    with pytest.raises(FedUnlearnError, match=named.replace(".", r"\.")) as refused:
        load_config(None, ["defence.upload=secagg", setting])
    assert "\n" not in str(refused.value) and "secagg" in str(refused.value)


def _serve(engine, settings, folder):
    config = load_config(None, TINY + settings)
    federation = build_federation(config.data, config.run.seed)
    folder.mkdir()
    config, schedule, history = schedule_and_history(config, federation, folder)
    return config, federated_server(config, federation, engine(config, federation), Progress(1, False), history,
                                    schedule).run()  # fmt: skip


@pytest.mark.parametrize("engine", [InProcessPool, BatchedPool])
def test_a_secure_run_trains_the_plain_runs_model(engine, tmp_path):
    results = {upload: _serve(engine, ["train.rounds=3", "eval.every=3", f"defence.upload={upload}",
                                       "defence.secagg_min_clients=1"], tmp_path / upload)[1]
               for upload in ("none", "secagg")}  # fmt: skip
    for key, value in results["none"].shared.items():
        np.testing.assert_allclose(results["secagg"].shared[key], value, atol=1e-6)
    assert results["secagg"].final["HR@10"] == results["none"].final["HR@10"]
    assert results["secagg"].final["train_loss"] == pytest.approx(results["none"].final["train_loss"], abs=1e-9)


@pytest.mark.parametrize("engine", [InProcessPool, BatchedPool])
def test_retrain_under_secure_aggregation_draws_its_training_afresh(engine, tmp_path):
    """With the run's own draws every retained client's contribution to a replayed round repeated to
    the bit, so the original round's secure sum less the replay's was the removed clients' upload.
    Retrain's replay is instead a run of its own training seed without the removed clients: equal to
    one started that way, and apart from the run's own draws."""
    settings = ["train.rounds=3", "eval.every=3", 'unlearn.drop="3@3"', "unlearn.method=retrain",
                "defence.upload=secagg", "defence.secagg_min_clients=1"]  # fmt: skip
    config, secure = _serve(engine, settings, tmp_path / "secure")
    (event,) = secure.events
    seed = retrain_seed(config, 3)
    assert seed != config.run.training_seed()
    removed = f"data.exclude_clients={json.dumps(event['clients'])}"
    _, alone = _serve(engine, ["train.rounds=2", "eval.every=2", f"run.train_seed={seed}", removed], tmp_path / "alone")
    for key, value in alone.shared.items():
        np.testing.assert_allclose(secure.unlearned[key], value, atol=1e-6)
    assert event["after"]["HR@10"] == alone.final["HR@10"]
    _, own_draws = _serve(engine, ["train.rounds=2", "eval.every=2", removed], tmp_path / "own")
    assert not np.allclose(secure.unlearned["item_emb"], own_draws.shared["item_emb"], atol=1e-3)
    assert event["initial"] == initial_key(derive(config, {"run.train_seed": seed}))  # what it grew from


def test_an_experiment_takes_the_cosine_to_a_secure_retrain_from_retrain_s_own_start(tmp_path):
    """A secure Retrain starts from parameters of its own draw: the cosine of another method's change
    to Retrain's took both changes from the run's start (a review: -0.063 where -0.050 was right)."""
    from fedunlearn.cli import main
    from fedunlearn.fl.comparison import _initial

    spec = tmp_path / "e.toml"
    base = {**dict(s.split("=", 1) for s in TINY), "train.rounds": "4", "eval.every": "4",
            "unlearn.drop": "'3@3'", "defence.upload": "'secagg'", "defence.secagg_min_clients": "1"}  # fmt: skip
    spec.write_text("[base]\n" + "".join(f'"{k}" = {v}\n' for k, v in base.items())
                    + "".join(f'[[setting]]\nname = "{m}"\nset = {{ "unlearn.method" = "{m}" }}\n'
                              for m in ("retrain", "none")))  # fmt: skip
    assert main(["experiment", str(spec), "--out", str(tmp_path / "x"), "--quiet"]) == 0
    runs = pd.read_csv(tmp_path / "x" / "runs.csv").set_index("method")
    config = load_config(None, TINY + ['unlearn.drop="3@3"', "defence.upload=secagg"])
    assert runs.loc["retrain", "initial"] == initial_key(derive(config, {"run.train_seed": retrain_seed(config, 3)}))
    assert runs.loc["none", "initial"] == initial_key(config)
    models = {m: dict(np.load(tmp_path / "x" / m / "unlearned.npz")) for m in ("retrain", "none")}
    moved = {m: np.concatenate([(p[k] - start[k]).ravel() for k in sorted(p)])
             for m, p in models.items() for start in [_initial(runs.loc[m].to_dict() | {"method": m}, p)]}  # fmt: skip
    expected = moved["none"] @ moved["retrain"] / (np.linalg.norm(moved["none"]) * np.linalg.norm(moved["retrain"]))
    assert runs.loc["none", "cosine_to_retrain"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("engine", [InProcessPool, BatchedPool])
def test_rows_fewer_than_secagg_min_clients_touched_sit_out_the_secure_step(engine, monkeypatch):
    """A row's secure sum over one client is that client's change: with defence.secagg_min_clients = 3
    the rows one or two clients touched keep their value, and every other row takes the plain
    aggregation's step over all the round's uploads."""
    config = load_config(None, TINY + ["defence.upload=secagg", "defence.secagg_min_clients=3",
                                       "data.synthetic_items=600", "train.fraction=0.5"])  # fmt: skip
    federation = build_federation(config.data, config.run.seed)
    pool = engine(config, federation)
    seen = []
    train = pool.train
    monkeypatch.setattr(pool, "train", lambda *args, **kwargs: seen.extend(train(*args, **kwargs)) or seen)
    server = federated_server(config, federation, pool, Progress(1, False))
    clients = server.sample(1)
    stepped, _ = server.train_round(1, clients, server.shared)
    updates = [reply.value for reply in seen]
    counts = np.zeros(federation.n_items, dtype=int)
    for update in updates:
        counts[update.item_ids] += 1
    assert len(updates) == len(clients) >= 3 and (counts == 1).any() and (counts == 2).any() and (counts >= 3).any()
    plain = aggregate_delta(pool.model, server.shared, updates, config.train.server_lr, config.train.dense_server_lr)
    for key in pool.model.row_keys:
        alone = counts < 3
        np.testing.assert_array_equal(stepped[key][alone], server.shared[key][alone])
        np.testing.assert_allclose(stepped[key][~alone], server.shared[key][~alone] + plain[key][~alone], atol=1e-6)


def test_under_secure_aggregation_the_upload_attacks_read_every_client_alike(tmp_path):
    folder = run_cli(SECURE, "batched", tmp_path / "secure")
    audit = pd.read_csv(folder / "audit.csv")
    uploads = audit[(audit.audit == "global") & audit.view.str.startswith("upload")]
    assert set(uploads.view) == {"upload", "upload-direction", "upload-items"}
    assert np.allclose(uploads.balanced_accuracy, uploads.chance)  # one view shared by all: a constant guess


@pytest.mark.flower
def test_on_flower_the_server_receives_the_rounds_only_as_a_secagg_sum_and_trains_the_same_model(tmp_path):
    """Also through a Retrain event, whose replay's own training draws reach the Flower clients."""
    drop = ['unlearn.drop="3@2"', "unlearn.method=retrain"]
    config = load_config(None, TINY + ["train.rounds=2", "eval.every=2", "defence.upload=secagg", *drop])
    federation = build_federation(config.data, config.run.seed)
    stores = {}
    for engine in ("inprocess", "flower"):
        (tmp_path / engine).mkdir()
        config, *stores[engine] = schedule_and_history(config, federation, tmp_path / engine)
    schedule, history = stores["inprocess"]
    expected = federated_server(config, federation, InProcessPool(config, federation), Progress(1, False), history,
                                schedule).run()  # fmt: skip

    def kept(result, pool):
        return result, list(zip(pool.reply_types, pool.replies_seen, strict=True))

    result, replies = simulate_then(config, federation.n_clients, kept, stores["flower"][1], stores["flower"][0])
    n = federation.n_clients
    for key, value in expected.shared.items():  # SecAgg+ rounds each contribution to its grid
        np.testing.assert_allclose(result.unlearned[key], expected.unlearned[key], atol=50 * n * resolution(n, 1.0))
        np.testing.assert_allclose(result.shared[key], value, atol=50 * n * resolution(n, 1.0))
    trained = n + 2 * (n - 1)  # round 1, Retrain's replay of it and round 2 without client 3
    training = [content for kind, content in replies if kind == TRAIN]
    assert len(training) == trained and all(not content.array_records for content in training)  # ids only
    stages = [content for kind, content in replies if kind == "train"]  # SecAgg+: 4 stages, each client, in
    sums = 2 * trained  # each round's two sums: the rows touched (defence.secagg_min_clients = 2), then the uploads
    assert len(stages) == 4 * sums
    assert all(len(record) == 0 for content in stages for record in content.array_records.values())
    sent = {key for content in stages for key in content.config_records[RECORD_KEY_CONFIGS]}
    assert Key.MASKED_PARAMETERS in sent and sent <= PROTOCOL_KEYS  # key material and masked vectors only
    protocol = [content.config_records[RECORD_KEY_CONFIGS] for content in stages]
    vectors = [bytes_to_ndarray(record[Key.MASKED_PARAMETERS][1]) for record in protocol
               if Key.MASKED_PARAMETERS in record]  # fmt: skip
    assert len(vectors) == sums and all(v.max() > quantization_range(n) for v in vectors)  # masked, not quantised


@pytest.mark.flower
def test_on_flower_the_rows_too_few_clients_touched_sit_out_as_in_process():
    """A sparse federation where many rows are left out each round (defence.secagg_min_clients = 3):
    the two SecAgg+ sums give the in-process model, and the rows no 3 clients touched never move."""
    sets = ["data.synthetic_users=30", "data.synthetic_items=600", "train.fraction=0.3", "train.rounds=2",
            "eval.every=2", "defence.upload=secagg", "defence.secagg_min_clients=3"]  # fmt: skip
    config = load_config(None, TINY + sets)
    federation = build_federation(config.data, config.run.seed)
    expected = federated_server(config, federation, InProcessPool(config, federation), Progress(1, False)).run()
    result = simulate_then(config, federation.n_clients, lambda result, pool: result)
    n = federation.n_clients
    initial = federated_server(config, federation, InProcessPool(config, federation), Progress(1, False)).initial
    every_row = load_config(None, [*TINY, *sets, "defence.secagg_min_clients=1"])
    summed = federated_server(every_row, federation, InProcessPool(every_row, federation), Progress(1, False)).run()
    still = np.all(expected.shared["item_emb"] == initial["item_emb"], axis=1)
    moved_when_summed = np.any(summed.shared["item_emb"] != initial["item_emb"], axis=1)
    assert (still & moved_when_summed).sum() > 10  # trained rows that sat out every round: the path is exercised
    np.testing.assert_array_equal(result.shared["item_emb"][still], initial["item_emb"][still])
    for key, value in expected.shared.items():
        np.testing.assert_allclose(result.shared[key], value, atol=50 * n * resolution(n, 1.0))


@pytest.mark.flower
def test_on_flower_a_client_refusing_its_contribution_stops_the_run_with_its_reason_on_one_line(tmp_path, capsys):
    from fedunlearn.cli import main

    settings = TINY + ["train.rounds=1", "defence.upload=secagg", "defence.secagg_bound=0.001", "run.engine=flower"]
    args = [part for setting in settings for part in ("--set", setting)]
    assert main(["run", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fedunlearn: error: the secure sum of round 1 failed: client ")
    assert error.endswith("raise defence.secagg_bound")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_the_secure_layout_is_the_same_whatever_order_the_shared_tensors_come_in_and_refuses_misplaced_rows():
    """Client and server build the layout from their own dicts of shapes: the dense tensors sit in
    one (sorted) order, so a contribution is read back into the tensors it came from; a negative
    item id (it would wrap into the last row) or a dense change of another shape is refused."""
    from dataclasses import replace

    config = load_config(None, TINY + ["model.name=ncf"])
    model = build_model(config.model, 40)
    shared = model.init_shared(np.random.default_rng(0))
    shapes = {k: v.shape for k, v in shared.items()}
    forward = SecureLayout.of(model, shapes, 30, 1.0, 1.0, 64)
    backward = SecureLayout.of(model, dict(reversed(list(shapes.items()))), 30, 1.0, 1.0, 64)
    update = _updates(model, shared, np.random.default_rng(3), n=1)[0]
    np.testing.assert_array_equal(forward.contribution(update), backward.contribution(update))
    wrapped = replace(update, item_ids=np.concatenate([[-1], update.item_ids[1:]]))
    with pytest.raises(FedUnlearnError, match="item ids outside"):
        forward.check(wrapped)
    key = next(iter(update.dense))
    with pytest.raises(FedUnlearnError, match="dense changes do not have the model's shapes"):
        forward.check(replace(update, dense={**update.dense, key: np.zeros(1, np.float32)}))


def test_a_client_refuses_to_sum_its_rows_without_the_servers_count_when_the_run_asks_for_one():
    from clients.app import kept_rows_of
    from clients.messages import KEPT_ROWS, array_field

    counted, uncounted = (load_config(None, [*TINY, f"defence.secagg_min_clients={k}"]) for k in (2, 1))
    assert kept_rows_of({}, 5, uncounted) is None  # every row summed
    with pytest.raises(ValueError, match="secagg_min_clients = 2 and no kept-rows came"):
        kept_rows_of({}, 5, counted)
    with pytest.raises(ValueError, match="kept-rows must be 5 booleans"):
        kept_rows_of({KEPT_ROWS: array_field(np.ones(4, dtype=bool))}, 5, counted)
    kept = np.array([True, False, True, True, False])
    np.testing.assert_array_equal(kept_rows_of({KEPT_ROWS: array_field(kept)}, 5, counted), kept)
