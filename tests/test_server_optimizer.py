"""The adaptive server optimizers (FedAdam / FedYogi on item rows, row by row)."""

import numpy as np
import pytest
from test_unlearning import server_for

from fedunlearn.config import load_config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.server_optimizer import RowwiseAdaptive


def test_adam_step_by_hand_moves_only_the_carried_rows():
    optimizer = RowwiseAdaptive("adam", 0.5, {"items": (3, 2)})
    change = np.array([[0.2, -0.4], [9.0, 9.0], [0.0, 0.1]])
    carried = np.array([True, False, True])
    first = optimizer.step({"items": change}, carried)["items"]
    # round 1: m = 0.1 g, v = 0.01 g^2, bias correction sqrt(1 - 0.99) / (1 - 0.9) = 1
    expected = 0.5 * 0.1 * change / (np.sqrt(0.01 * change**2) + 1e-3)
    expected[1] = 0.0
    np.testing.assert_allclose(first, expected, rtol=1e-12)
    assert optimizer.updates.tolist() == [1, 0, 1]
    assert not optimizer.first["items"][1].any() and not optimizer.second["items"][1].any()
    # round 2 carries only row 1: its own first update (count 1), rows 0 and 2 keep their moments
    before = optimizer.first["items"].copy()
    second = optimizer.step({"items": change}, np.array([False, True, False]))["items"]
    np.testing.assert_allclose(second[1], 0.5 * 0.1 * 9.0 / (0.1 * 9.0 + 1e-3), rtol=1e-12)
    assert not second[[0, 2]].any()
    np.testing.assert_array_equal(optimizer.first["items"][[0, 2]], before[[0, 2]])
    # row 0's second update: m = 0.9 m1 + 0.1 g, v = 0.99 v1 + 0.01 g^2, count 2
    third = optimizer.step({"items": change}, carried)["items"]
    g = change[0]
    m, v = 0.9 * 0.1 * g + 0.1 * g, 0.99 * 0.01 * g**2 + 0.01 * g**2
    correction = np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(third[0], 0.5 * correction * m / (np.sqrt(v) + 1e-3), rtol=1e-12)


def test_yogi_second_moment_moves_by_the_sign_of_its_gap():
    optimizer = RowwiseAdaptive("yogi", 1.0, {"items": (1, 1)})
    carried = np.array([True])
    optimizer.step({"items": np.array([[0.5]])}, carried)
    assert optimizer.second["items"][0, 0] == pytest.approx(0.01 * 0.25)  # 0 - 0.01 g^2 * sign(0 - g^2)
    step = optimizer.step({"items": np.array([[0.1]])}, carried)["items"][0, 0]
    v = 0.0025 - 0.01 * 0.01 * np.sign(0.0025 - 0.01)  # v < g^2: grows
    m = 0.9 * 0.05 + 0.1 * 0.1
    assert optimizer.second["items"][0, 0] == pytest.approx(v)
    assert step == pytest.approx(m / (np.sqrt(v) + 1e-3))  # no bias correction, as Flower's FedYogi


def test_adam_server_changes_the_model_and_retrain_still_equals_a_run_without_the_clients(tmp_path):
    adam = ["train.server_optimizer=adam", "train.server_optimizer_lr=0.1"]
    dropped, _, _ = server_for(tmp_path, ["unlearn.method=retrain", *adam], drop="3,7@4")
    fresh, _, _ = server_for(tmp_path, ['data.exclude_clients=["3","7"]', *adam])
    plain, _, _ = server_for(tmp_path, ['data.exclude_clients=["3","7"]'])
    with_drop, without, sgd = dropped.run(), fresh.run(), plain.run()
    for key in with_drop.shared:  # Retrain restarts the server optimizer with the model
        np.testing.assert_array_equal(with_drop.shared[key], without.shared[key])
    assert not np.allclose(without.shared["item_emb"], sgd.shared["item_emb"])


@pytest.mark.parametrize("method", ["federaser", "fru", "accum", "ascent"])
def test_methods_that_replay_stored_updates_refuse_an_adaptive_server(method):
    with pytest.raises(FedUnlearnError, match="train.server_optimizer = 'adam'"):
        load_config(None, ["train.server_optimizer=adam", f"unlearn.method={method}"])
    with pytest.raises(FedUnlearnError, match="unlearn.compare .*: use unlearn.compare = false"):
        load_config(None, ["train.server_optimizer=yogi", "unlearn.compare=true"])
    # the fix it named was the setting already given (a review)
    with pytest.raises(FedUnlearnError, match="use unlearn.compare = false or another defence.upload"):
        load_config(None, ["defence.upload=secagg", "unlearn.method=retrain", "unlearn.compare=true"])
