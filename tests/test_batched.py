"""The batched engine against the in-process runner (the reference), on small federations.

Tolerance (docs/ARCHITECTURE.md): the two engines run the same plans, losses and Adam, and differ
only in the order of float sums, so shared parameters agree to 1e-4 and HR@10 exactly here; NCF
trained with BPR and Adam is the documented exception (`chaotic_under_reordering`)."""

import numpy as np
import pytest
import torch
from helpers import TINY

from fedunlearn.config import derive, load_config
from fedunlearn.engines import batched
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.engines.batched_trainer import Adam, BatchedTrainer, Workspace, client_losses
from fedunlearn.engines.choice import chaotic_under_reordering, choose_engine
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.aggregation import aggregate
from fedunlearn.fl.client import plan_local_training
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.schedule import build_schedule
from fedunlearn.fl.training import recommendation_loss
from fedunlearn.models import build_model
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from fedunlearn.seeding import Stream, rng_for
from fedunlearn.unlearning.methods import history_policy

SMALL = TINY + ["data.synthetic_users=16", "train.rounds=4", "eval.every=1", "train.fraction=0.6"]
TOLERANCE = 1e-4  # absolute, on parameters of size ~0.1-1: float-order noise that Adam amplifies a little per round


def run(pool_class, overrides, tmp_path=None, drop=""):
    config = load_config(None, SMALL + overrides)
    federation = build_federation(config.data, config.run.seed)
    schedule = build_schedule(drop, "", federation.client_ids, config.train.rounds, config.run.seed)
    history = None
    if drop:
        path = tmp_path / f"{pool_class.__name__}.sqlite"
        history = HistoryStore(path, history_policy(config.unlearn))
    pool = pool_class(config, federation)
    server = federated_server(config, federation, pool, Progress(1, False), history, schedule)
    return server.run(), pool


def assert_same_run(expected, got, tolerance=TOLERANCE, loss_rtol=1e-4):
    assert [r["HR@10"] for r in got.rounds] == [r["HR@10"] for r in expected.rounds]
    assert [r["clients"] for r in got.rounds] == [r["clients"] for r in expected.rounds]
    np.testing.assert_allclose([r["train_loss"] for r in got.rounds], [r["train_loss"] for r in expected.rounds],
                               rtol=loss_rtol)  # fmt: skip
    for key in expected.shared:
        np.testing.assert_allclose(got.shared[key], expected.shared[key], atol=tolerance)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.name=mf"],
        ["model.name=mf", "model.loss=bce", "train.local_epochs=2"],
        ["model.name=mf", "train.optimizer=sgd", "train.negative_sampler=fru"],
        ["model.name=ncf", "model.loss=bce"],
        ["model.name=ncf", "train.optimizer=sgd", "train.lr=0.1"],
    ],
)
def test_batched_training_equals_the_inprocess_runner(overrides):
    expected, reference = run(InProcessPool, overrides)
    got, pool = run(BatchedPool, overrides)
    assert_same_run(expected, got)
    for index, user in reference.user_state.items():  # every client's private part too
        for key, value in user.items():
            np.testing.assert_allclose(pool.user(index)[key], value, atol=TOLERANCE)
    assert not chaotic_under_reordering(load_config(None, SMALL + overrides))


@pytest.mark.parametrize(("model", "budget"), [("mf", 1_000), ("ncf", 12_000)])  # floats: 2-3 clients per group
def test_groups_of_clients_sharing_the_scratch_buffers_give_the_same_run(monkeypatch, model, budget):
    """A tiny float budget cuts every round into several groups of clients, which train one after
    another in the same kept buffers: the uploads and users must not bleed between them."""
    overrides = [f"model.name={model}", "model.loss=bce"]
    expected, _ = run(InProcessPool, overrides)
    groups = []
    original = BatchedTrainer.train

    def counted(self, plans, *args):
        groups.append(len(plans))
        return original(self, plans, *args)

    monkeypatch.setattr(batched, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(BatchedTrainer, "train", counted)
    got, _ = run(BatchedPool, overrides)
    assert len(groups) > 2 * len(got.rounds) and max(groups) > 1
    assert_same_run(expected, got)


@pytest.mark.parametrize("method", ["federaser", "fru", "ascent"])
def test_unlearning_on_the_batched_engine_equals_the_inprocess_runner(tmp_path, method):
    overrides = ["model.name=mf", f"unlearn.method={method}", "unlearn.poison=true"]
    expected, reference = run(InProcessPool, overrides, tmp_path, drop="3,7@3")
    got, pool = run(BatchedPool, overrides, tmp_path, drop="3,7@3")
    # FedEraser and ascent rescale to stored step sizes: the ratio carries the float noise into every
    # element, hence 10x the training tolerance. FRU's storage rule (stored and, for its size
    # reference, fresh) also picks each update's top-alpha rows, where float noise can swap two rows
    # of near-equal change on this 16-client federation: seen, parameters 2.2e-3, train loss 3e-4
    # and the leaving clients' MIA AUC 0.0066 apart after the event; HR@10 stays identical
    fru = method == "fru"
    assert_same_run(expected, got, (30 if fru else 10) * TOLERANCE, 1e-3 if fru else 1e-4)
    mia = pytest.approx(expected.events[0]["MIA_AUC"], abs=0.01 if fru else 1e-6)
    assert got.events[0]["MIA_AUC"] == mia
    assert got.events[0]["client_epochs"] == expected.events[0]["client_epochs"]
    assert not pool.ready[[3, 7]].any() and not pool.users["user_emb"][[3, 7]].any()  # forgotten


def test_ncf_with_bpr_and_adam_differs_only_where_bpr_is_blind_and_auto_picks_the_inprocess_runner():
    config = load_config(None, SMALL + ["model.name=ncf"])
    federation = build_federation(config.data, config.run.seed)
    model = build_model(config.model, federation.n_items)
    shared = model.init_shared(rng_for(0, Stream.SHARED_INIT))
    clients = list(range(federation.n_clients))
    expected = sorted((r.value for r in InProcessPool(config, federation).train(1, clients, shared, lambda _: None)),
                      key=lambda u: u.client_id)  # fmt: skip
    got = sorted((r.value for r in BatchedPool(config, federation).train(1, clients, shared, lambda _: None)),
                 key=lambda u: u.client_id)  # fmt: skip
    for a, b in zip(expected, got, strict=True):
        for key in a.rows:
            np.testing.assert_allclose(b.rows[key], a.rows[key], atol=TOLERANCE)
        for key in a.dense:  # biases of the output and of always-active last-layer units are blind to BPR
            if key not in ("out.bias", "mlp2.bias"):
                np.testing.assert_allclose(b.dense[key], a.dense[key], atol=TOLERANCE)
    # the output bias is invisible to BPR: moving it changes no loss, so its gradient is pure rounding
    moved = aggregate(model, shared, got, 3.0)
    moved_only_bias = dict(shared, **{"out.bias": moved["out.bias"] + 5})
    user = {k: torch.tensor(v) for k, v in model.init_user(np.random.default_rng(1)).items()}
    items = {k: torch.tensor(shared[k][:6]) for k in model.row_keys}
    losses = []
    for params in (shared, moved_only_bias):
        dense = {k: torch.tensor(params[k]) for k in model.dense_keys(params)}
        scores = model.score(user, items, dense)
        losses.append(float(recommendation_loss("bpr", scores[:2], scores[2:].reshape(2, 2))))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert chaotic_under_reordering(config) and choose_engine(config) == "inprocess"
    config = derive(config, {"run.engine": "batched"})
    assert choose_engine(config) == "batched"  # asked for by name, it runs


def test_client_losses_equal_each_clients_own_loss_with_padding():
    rng = np.random.default_rng(0)
    positive, negative = torch.tensor(rng.normal(size=(2, 3))), torch.tensor(rng.normal(size=(2, 3, 4)))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second client's batch holds 2 examples
    for loss in ("bpr", "bce"):
        config = load_config(None, [f"model.loss={loss}"])
        got = client_losses(config, positive, negative, mask, mask.sum(1))
        assert float(got[0]) == pytest.approx(float(recommendation_loss(loss, positive[0], negative[0])), rel=1e-12)
        assert float(got[1]) == pytest.approx(
            float(recommendation_loss(loss, positive[1, :2], negative[1, :2])), rel=1e-12
        )


def test_prefix_adam_is_torch_adam_for_active_rows_and_leaves_the_rest_alone():
    rng = np.random.default_rng(0)
    table = torch.tensor(rng.normal(size=(5, 3)), dtype=torch.float32)
    reference = table[:2].clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=0.05)
    ours = Adam(0.05, use_adam=True, workspace=Workspace(torch.device("cpu")))
    gradients = [torch.tensor(rng.normal(size=(3, count)), dtype=torch.float32).T for count in [5, 4, 2, 2]]
    for step, grad in enumerate(gradients, start=1):  # transposed (strided) gradients, as autograd returns some
        count = len(grad)
        before = table[count:].clone()
        ours.step({"t": table}, {"t": count}, [grad], step)
        assert torch.equal(table[count:], before)
        reference.grad = grad[:2].contiguous()  # rows 0-1 take every step: torch's own Adam on them
        torch_adam.step()
    np.testing.assert_allclose(table[:2].numpy(), reference.detach().numpy(), rtol=0, atol=1e-7)


def test_batched_pool_keeps_client_state_in_one_array_per_user_table():
    config = load_config(None, SMALL + ["model.name=ncf"])
    pool = BatchedPool(config, build_federation(config.data, config.run.seed))
    assert set(pool.users) == {"user_gmf", "user_mlp"}
    assert all(table.shape == (16, 8) for table in pool.users.values())
    twin = pool.fork()
    twin.set_user(0, {"user_gmf": np.ones(8, np.float32), "user_mlp": np.ones(8, np.float32)})
    assert not pool.ready[0] and twin.ready[0] and not pool.users["user_gmf"][0].any()


@pytest.mark.parametrize("ascent", [False, True])
def test_closed_form_mf_gradients_equal_autograd_through_the_model(ascent):
    config = load_config(None, SMALL + ["model.name=mf", "train.weight_decay=0.01", "train.batch_size=4"])
    federation = build_federation(config.data, config.run.seed)
    pool = BatchedPool(config, federation)
    clients = [0, 3, 5, 9]
    shared = pool.model.init_shared(np.random.default_rng(1))
    order = sorted(clients, key=lambda index: -len(federation.client(index).train_items))
    plans = [plan_local_training(pool.model, federation.client(i), pool.user(i), shared, config, 1) for i in order]
    users = {key: table[order] for key, table in pool.users.items()}
    assert len({len(plan.batches) for plan in plans}) > 1  # clients drop out of the prefix at different steps
    closed = BatchedTrainer(pool.model, config, pool.device).train(plans, users, shared, ascent)
    generic_model = build_model(config.model, federation.n_items)
    generic_model.dot_product = False
    generic = BatchedTrainer(generic_model, config, pool.device).train(plans, users, shared, ascent)
    for key in closed[0]:
        np.testing.assert_allclose(closed[0][key], generic[0][key], rtol=0, atol=1e-6)
    for ours, theirs in zip(closed[1], generic[1], strict=True):
        np.testing.assert_allclose(ours["item_emb"], theirs["item_emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(closed[3], generic[3], rtol=1e-6)
