import numpy as np
import pytest
import torch

from fedunlearn.config import Config, ModelConfig, TrainConfig
from fedunlearn.fl.aggregation import aggregate
from fedunlearn.fl.client import init_user, local_evaluate, local_train, plan_local_training
from fedunlearn.fl.federation import ClientData
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.models import build_model
from fedunlearn.models.mf import MF
from fedunlearn.models.ncf import NCF

CPU = torch.device("cpu")


def client(index=0, n_items=30):
    return ClientData(
        index=index,
        client_id=str(100 + index),
        n_items=n_items,
        train_items=np.array([1, 4, 7, 9]),
        valid_item=12,
        test_item=13,
        test_negatives=np.array([0, 2, 3, 5, 6]),
    )


def test_row_wise_weighted_mean_over_the_clients_that_touched_each_row():
    model = MF(n_items=4, dim=2, init_std=0.1)
    shared = {"item_emb": np.zeros((4, 2), dtype=np.float32)}
    a = ClientUpdate("a", 1, np.array([0, 1]), {"item_emb": np.array([[1, 1], [2, 2]], np.float32)}, {}, 0.0)
    b = ClientUpdate("b", 3, np.array([1, 2]), {"item_emb": np.array([[6, 6], [4, 4]], np.float32)}, {}, 0.0)
    new = aggregate(model, shared, [b, a], server_lr=0.5)
    expected = np.array([[0.5, 0.5], [0.5 * (2 + 18) / 4, 0.5 * (2 + 18) / 4], [2, 2], [0, 0]])
    np.testing.assert_allclose(new["item_emb"], expected)
    assert new["item_emb"].dtype == np.float32
    np.testing.assert_array_equal(shared["item_emb"], 0)  # the input is not modified


def test_the_packed_aggregate_equals_the_per_client_loop_to_the_bit_whatever_the_arrival_order():
    from fedunlearn.fl.aggregation import aggregate_delta

    rng = np.random.default_rng(3)
    model = build_model(ModelConfig(name="ncf", dim=4, mlp_layers=[8]), n_items=30)
    shared = model.init_shared(rng)
    updates = []
    for c in range(12):
        ids = np.sort(rng.choice(25, size=int(rng.integers(1, 20)), replace=False))  # rows 25-29 untouched
        rows = {key: rng.standard_normal((len(ids), shared[key].shape[1])).astype(np.float32) for key in model.row_keys}
        dense = {key: rng.standard_normal(shared[key].shape).astype(np.float32) for key in model.dense_keys(shared)}
        updates.append(ClientUpdate(f"c{c}", int(rng.integers(1, 50)), ids, rows, dense, 0.0))
    expected = {key: np.zeros(value.shape) for key, value in shared.items()}  # the definition, client by client
    weight = np.zeros(30)
    for update in sorted(updates, key=lambda u: u.client_id):
        weight[update.item_ids] += update.num_examples
        for key in model.row_keys:
            expected[key][update.item_ids] += update.num_examples * update.rows[key].astype(np.float64)
    for key in model.row_keys:
        expected[key][weight > 0] = 2.0 * expected[key][weight > 0] / weight[weight > 0, None]
    total = float(sum(u.num_examples for u in updates))
    for key in model.dense_keys(shared):
        ordered = sorted(updates, key=lambda u: u.client_id)
        expected[key] = 0.5 * sum(u.num_examples * u.dense[key].astype(np.float64) for u in ordered) / total
    shuffled = [updates[i] for i in rng.permutation(len(updates))]
    delta = aggregate_delta(model, shared, shuffled, server_lr=2.0, dense_lr=0.5)
    for key in shared:
        np.testing.assert_array_equal(delta[key], expected[key])
    assert np.count_nonzero(weight == 0) == 5  # untouched rows stay zero
    np.testing.assert_array_equal(delta[model.row_keys[0]][weight == 0], 0)


def test_dense_layers_are_fedavg_weighted_by_examples():
    model = NCF(n_items=3, dim=2, init_std=0.1, mlp_layers=[2])
    shared = model.init_shared(np.random.default_rng(0))
    deltas = [{k: np.full_like(v, fill) for k, v in shared.items() if k not in model.row_keys} for fill in (1.0, 4.0)]
    updates = [
        ClientUpdate(
            name, w, np.array([], dtype=np.int64), {k: np.zeros((0, 2), np.float32) for k in model.row_keys}, d, 0.0
        )
        for name, w, d in (("a", 2, deltas[0]), ("b", 1, deltas[1]))
    ]
    new = aggregate(model, shared, updates, server_lr=1.0)
    for key in deltas[0]:
        np.testing.assert_allclose(new[key], shared[key] + (2 * 1 + 4) / 3, rtol=1e-6)
    for key in model.row_keys:
        np.testing.assert_array_equal(new[key], shared[key])


@pytest.mark.parametrize("name", ["mf", "ncf"])
def test_local_train_uploads_only_touched_shared_rows_and_is_deterministic(name):
    model_config = ModelConfig(name=name, dim=4, negatives=2, mlp_layers=[8, 4])
    train = TrainConfig(local_epochs=2, lr=0.1, batch_size=2)
    model = build_model(model_config, 30)
    shared = model.init_shared(np.random.default_rng(0))
    user = init_user(model, seed=0, client_id="100")
    config = Config(model=model_config, train=train)
    run = lambda: local_train(model, client(), user, shared, config, 1, CPU)  # noqa: E731
    (update, new_user), (again, _) = run(), run()
    # exactly the rows of the positives and of the negatives drawn for them: no other row leaves
    plan = plan_local_training(model, client(), user, shared, config, 1)
    drawn = plan.touched[plan.local_neg].ravel()  # local_epochs=2: every positive is used in each epoch
    np.testing.assert_array_equal(update.item_ids, np.union1d([1, 4, 7, 9], drawn))
    assert update.num_examples == 4 and update.client_id == "100"
    change = sum(np.abs(update.rows[key]).sum(axis=1) for key in model.row_keys)
    assert change.min() > 0  # every uploaded row was really trained
    for key in model.row_keys:
        assert update.rows[key].shape == (len(update.item_ids), 4)
        np.testing.assert_array_equal(update.rows[key], again.rows[key])
    # the user part changed on the client, and nothing uploaded equals it
    for key, value in new_user.items():
        assert not np.allclose(value, user[key])
        for array in [update.item_ids, *update.rows.values(), *update.dense.values()]:
            assert not any(np.allclose(row, value) for row in np.atleast_2d(array) if row.shape == value.shape)


def test_training_raises_the_score_of_positives():
    model_config = ModelConfig(name="mf", dim=8, negatives=4)
    model = build_model(model_config, 30)
    shared = model.init_shared(np.random.default_rng(0))
    user = init_user(model, 0, "100")
    data = client()
    config = Config(model=model_config, train=TrainConfig(lr=0.05))
    before = local_evaluate(model, data, user, shared, config, CPU)
    for round_number in range(1, 30):
        update, user = local_train(model, data, user, shared, config, round_number, CPU)
        shared = aggregate(model, shared, [update], server_lr=1.0)
    scores = shared["item_emb"] @ user["user_emb"]
    assert scores[[1, 4, 7, 9]].mean() > scores[[0, 2, 3, 5, 6]].mean() + 1.0
    assert before.client_id == "100"


def test_full_ranking_excludes_the_users_own_items():
    model = MF(n_items=30, dim=2, init_std=0.1)
    shared = {"item_emb": np.zeros((30, 2), np.float32)}
    shared["item_emb"][13] = [1, 0]  # the test item scores highest
    shared["item_emb"][[1, 4, 7, 9, 12]] = [2, 0]  # own items score higher still but are excluded
    config = Config()
    config.eval.full_ranking = True
    evaluation = local_evaluate(model, client(), {"user_emb": np.array([1, 0], np.float32)}, shared, config, CPU)
    assert evaluation.rank == 0
    assert evaluation.full_rank == 0


def test_validation_item_is_ranked_against_the_same_negatives_without_the_test_item():
    from fedunlearn.fl.client import rank_held_out

    scores = np.zeros(30)
    scores[[0, 2, 3]] = 5.0  # three negatives above everything
    scores[13] = 4.0  # test item: rank 3
    scores[12] = 10.0  # validation item: rank 0, and it does not push the test item down
    evaluation = rank_held_out(client(), lambda items: scores[items], full_ranking=True)
    assert (evaluation.rank, evaluation.valid_rank) == (3, 0)
    assert evaluation.full_rank == 3  # items 0, 2, 3 are unseen; 1, 4, 7, 9 (trained) and 12 are not counted


def test_a_fraction_of_an_epoch_trains_on_that_share_of_the_examples():
    model_config = ModelConfig(name="mf", dim=4, negatives=2)
    config = Config(model=model_config, train=TrainConfig(batch_size=1))
    model = build_model(model_config, 30)
    shared = model.init_shared(np.random.default_rng(0))
    user = init_user(model, 0, "100")
    half, _ = local_train(model, client(), user, shared, config, 1, CPU, epochs=0.5)
    whole, _ = local_train(model, client(), user, shared, config, 1, CPU)
    assert half.epochs == 0.5 and whole.epochs == 1.0
    assert set(half.item_ids) < set(whole.item_ids)  # 2 of the 4 positives, and their negatives


def test_fru_sampler_draws_a_beta_share_from_the_informative_pool():
    from fedunlearn.fl.training import informative_pool, sample_informative_negatives

    items = np.zeros((20, 2), np.float32)
    items[[3, 4]] = [5, 0]  # close to the user
    items[[8, 9]] = [0, 5]  # close to the positives' centroid
    items[[10, 11]] = [0, 1]  # the positives
    pool = informative_pool(np.array([1.0, 0.0]), items, np.array([10, 11]), share=0.1)
    assert set(pool) == {3, 4, 8, 9}
    negatives = sample_informative_negatives(np.random.default_rng(0), 20, np.array([10, 11]), (50, 4), pool, 0.5)
    assert set(negatives[:, :2].ravel()) <= {3, 4, 8, 9}
    assert not set(negatives[:, 2:].ravel()) <= {3, 4, 8, 9}
    assert not np.isin(negatives, [10, 11]).any()


def test_an_attacker_boosts_exactly_its_change_of_the_target_rows():
    from fedunlearn.config import UnlearnConfig

    model_config = ModelConfig(name="ncf", dim=4, negatives=2, mlp_layers=[8, 4])
    model = build_model(model_config, 30)
    shared = model.init_shared(np.random.default_rng(0))
    user = init_user(model, seed=0, client_id="100")
    updates = {}
    for boost in (1.0, 30.0):
        unlearn = UnlearnConfig(poison=True, target_item=20, attackers=["100"], poison_boost=boost)
        config = Config(model=model_config, train=TrainConfig(lr=0.1, batch_size=2), unlearn=unlearn)
        updates[boost], _ = local_train(model, client(), user, shared, config, 1, CPU)
    plain, boosted = updates[1.0], updates[30.0]
    np.testing.assert_array_equal(plain.item_ids, boosted.item_ids)
    target = int(np.searchsorted(plain.item_ids, 20))
    assert plain.item_ids[target] == 20  # the attacker trained on the target
    for key in model.row_keys:
        np.testing.assert_allclose(boosted.rows[key][target], 30.0 * plain.rows[key][target], rtol=1e-6)
        others = np.arange(len(plain.item_ids)) != target
        np.testing.assert_array_equal(boosted.rows[key][others], plain.rows[key][others])
