"""The job's assembly: the torch settings a job runs under and leaves behind, and models named in one registry."""

import numpy as np
import pytest
import torch

from fedunlearn.config import load_config
from fedunlearn.models import MODELS, build_model, settings_of
from fedunlearn.runs.assembly import reproducible_torch
from fedunlearn.runs.runner import execute

TINY = ["data.synthetic_users=12", "data.synthetic_items=40", "data.synthetic_interactions=8",
        "data.test_negatives=10", "eval.ks=[5, 10]", "model.dim=4", "train.rounds=1"]  # fmt: skip


@pytest.mark.parametrize("engine", ["inprocess", "batched"])
def test_a_job_gives_the_callers_torch_thread_count_back(engine, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        execute(load_config(None, [*TINY, f"run.engine={engine}", "run.num_cpus=2"]), tmp_path, show_progress=False)
        assert torch.get_num_threads() == 3  # a pool once set 1 (in-process) or run.num_cpus for good
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before)


def test_an_indexed_reads_gradient_is_the_same_bits_every_time_under_two_threads():
    """Without deterministic kernels this backward adds rows with atomics in thread order: on two
    threads six repeats gave six different gradients (docs/RESULTS.md)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(50, 64, generator=generator, requires_grad=True)
    rows = torch.randint(0, 50, (200_000,), generator=generator)
    upstream = torch.randn(200_000, 64, generator=generator)
    gradients = set()
    with reproducible_torch(2):
        for _ in range(6):
            table.grad = None
            table[rows].backward(upstream)
            gradients.add(table.grad.numpy().tobytes())
    assert len(gradients) == 1
    expected = torch.zeros(50, 64, dtype=torch.float64).index_add_(0, rows, upstream.double())
    np.testing.assert_allclose(table.grad.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_models_settings_are_read_back_off_its_shared_parameters(name):
    config = load_config(None, [f"model.name={name}", "model.dim=6", "model.mlp_layers=[10, 3]"])
    shared = build_model(config.model, 17).init_shared(np.random.default_rng(0))
    expected = {"name": name, "dim": 6} | ({"mlp_layers": [10, 3]} if name == "ncf" else {})
    assert settings_of(name, shared) == expected
