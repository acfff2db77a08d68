"""The job's assembly: the thread count a job leaves behind, and models named in one registry."""

import numpy as np
import pytest
import torch

from fedunlearn.config import load_config
from fedunlearn.models import MODELS, build_model, settings_of
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
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_models_settings_are_read_back_off_its_shared_parameters(name):
    config = load_config(None, [f"model.name={name}", "model.dim=6", "model.mlp_layers=[10, 3]"])
    shared = build_model(config.model, 17).init_shared(np.random.default_rng(0))
    expected = {"name": name, "dim": 6} | ({"mlp_layers": [10, 3]} if name == "ncf" else {})
    assert settings_of(name, shared) == expected
