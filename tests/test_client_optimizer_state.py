"""train.client_optimizer_state = "user": each client's Adam state for its user part kept across rounds."""

import numpy as np
import pytest
import torch
from test_batched import assert_same_run, run
from test_unlearning import server_for

from fedunlearn.config import load_config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.engines.batched_trainer import KeptUserAdam
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.client import UserMoments

KEEP = ["train.client_optimizer_state=user"]


def test_per_client_bias_correction_equals_torchs_adam_resumed_at_each_clients_step():
    """Two clients at different step counts (0 and 5) step at once; each must equal torch.optim.Adam
    resumed from its own state."""
    rng = np.random.default_rng(0)
    start, grad = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    first, second = rng.normal(size=(2, 4)) * [[0], [1]], rng.random((2, 4)) * [[0], [1]]  # client 0: no step yet
    moments = UserMoments(np.array([0, 5]), {"u": first.astype(np.float32)}, {"u": second.astype(np.float32)})
    kept = KeptUserAdam(moments, torch.device("cpu"))
    param = torch.tensor(start)
    for step in (1, 2):
        kept.step("u", param, torch.tensor(grad * step), step, lr=0.05)
    for client in range(2):
        reference = torch.tensor(start[client], requires_grad=True)
        optimizer = torch.optim.Adam([reference], lr=0.05)
        if moments.steps[client]:
            optimizer.state[reference] = {
                "step": torch.tensor(float(moments.steps[client])),
                "exp_avg": torch.tensor(moments.exp_avg["u"][client]),
                "exp_avg_sq": torch.tensor(moments.exp_avg_sq["u"][client]),
            }
        for step in (1, 2):
            reference.grad = torch.tensor(grad[client] * step)
            optimizer.step()
        np.testing.assert_allclose(param[client].numpy(), reference.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(kept.exp_avg_sq["u"][client].numpy(), optimizer.state[reference]["exp_avg_sq"],
                                   rtol=1e-6)  # fmt: skip
    assert list(kept.moments(np.array([2, 2])).steps) == [2, 7]


@pytest.mark.parametrize("overrides", [["model.name=mf"], ["model.name=ncf", "model.loss=bce"]])
def test_kept_state_is_the_same_on_both_engines_and_changes_the_run(overrides):
    expected, reference = run(InProcessPool, overrides + KEEP)
    got, pool = run(BatchedPool, overrides + KEEP)
    fresh, _ = run(BatchedPool, overrides)
    assert_same_run(expected, got)
    assert reference.moments and pool.moments is not None
    for index, moments in reference.moments.items():
        assert pool.moments.steps[index] == moments.steps > 0
        for key in moments.exp_avg:
            np.testing.assert_allclose(pool.moments.exp_avg[key][index], moments.exp_avg[key], atol=1e-5)
            np.testing.assert_allclose(pool.moments.exp_avg_sq[key][index], moments.exp_avg_sq[key], atol=1e-6)
    assert not np.allclose(got.shared["item_emb" if "mf" in overrides[0] else "mlp0.weight"],
                           fresh.shared["item_emb" if "mf" in overrides[0] else "mlp0.weight"])  # fmt: skip


def test_retrain_starts_the_leaving_and_the_retained_clients_from_no_step(tmp_path):
    dropped, _, pool = server_for(tmp_path, ["unlearn.method=retrain", *KEEP], drop="3,7@4")
    without, _, _ = server_for(tmp_path, ['data.exclude_clients=["3","7"]', *KEEP])
    with_drop, fresh = dropped.run(), without.run()
    for key in with_drop.shared:
        np.testing.assert_array_equal(with_drop.shared[key], fresh.shared[key])
    leaving = [pool.federation.client_ids.index(c) for c in ("3", "7")]
    assert not set(leaving) & set(pool.moments)


def test_the_setting_is_refused_where_it_cannot_hold():
    with pytest.raises(FedUnlearnError, match="set train.optimizer = 'adam'"):
        load_config(None, [*KEEP, "train.optimizer=sgd"])
    with pytest.raises(FedUnlearnError, match="use run.engine = 'batched' or 'inprocess'"):
        load_config(None, [*KEEP, "run.engine=flower"])
