"""`defence.compare` with at-risk clients on the Flower engine gives the in-process engine's table.

One Flower run for the module (`fedunlearn run --engine flower`, 8 clients, 2 rounds, audit on,
every post-training defence tried for 3 steps, D2D-R configured, each client deciding alone from
the audit's attackers whether it defends) and the same command on the in-process engine. Before the
defences the two engines hold bit-identical embeddings, so those rows must be equal; after them the
Flower defences' inputs are SecAgg+ sums, so the table agrees to 1e-4 (the tolerance of
tests/test_flower_defence.py and tests/test_flower_regularised.py). Every defence starts from the
trained embeddings and the clients end up holding the configured one's."""

import json

import numpy as np
import pytest
from helpers import TINY, assert_privacy_tables_match, run_cli

from fedunlearn.privacy.stage import POST_TRAINING

pytestmark = [
    pytest.mark.slow,  # 80 s of Flower runs: the default suite stays under 10 minutes on a 2-core machine
    pytest.mark.flower,
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

CLIENTS = 8
SETTINGS = TINY + [
    f"data.synthetic_users={CLIENTS}",
    "train.rounds=2",
    "eval.every=2",
    "audit.enabled=true",
    'audit.attributes=["gender", "age"]',
    "defence.compare=true",
    "defence.method=d2d-r",
    "defence.clients=at-risk",
    "defence.risk_threshold=0.7",  # 7 of the 8 clients at risk
    "defence.steps=3",
    "defence.lr=0.05",
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import server.audit
    from fedunlearn.privacy.common import flatten_users

    held = []
    audit_on_flower = server.audit.audit_on_flower

    def reading_back(config, federation, federated, pool, result):
        """The privacy stage, then the auditor reads what the clients hold at its end."""
        report = audit_on_flower(config, federation, federated, pool, result)
        held.append(flatten_users(federated.model, pool.audit_users(list(federated.active))))
        return report

    folder = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server.audit, "audit_on_flower", reading_back)
        flower = run_cli(SETTINGS, "flower", folder / "flower")
    return {"flower": flower, "inprocess": run_cli(SETTINGS, "inprocess", folder / "inprocess"), "held": held[0]}


def test_the_flower_compare_table_equals_the_inprocess_one(runs):
    flower = assert_privacy_tables_match(runs["flower"], runs["inprocess"], TOLERANCE)
    assert list(flower["defence"].unique()) == ["none", *POST_TRAINING]


def test_the_same_clients_defend_and_keep_the_configured_defence(runs):
    engines = ("flower", "inprocess")
    seen = {engine: np.load(runs[engine] / "central_view_embeddings.npz") for engine in engines}
    np.testing.assert_array_equal(seen["flower"]["before"], seen["inprocess"]["before"])
    np.testing.assert_allclose(seen["flower"]["after"], seen["inprocess"]["after"], rtol=0, atol=TOLERANCE)
    moved = {engine: np.abs(seen[engine]["after"] - seen[engine]["before"]).max(1) > 0 for engine in engines}
    np.testing.assert_array_equal(moved["flower"], moved["inprocess"])
    final = {engine: json.loads((runs[engine] / "final.json").read_text()) for engine in engines}
    assert final["flower"]["defending_clients"] == final["inprocess"]["defending_clients"] == moved["flower"].sum()
    assert 0 < moved["flower"].sum() < CLIENTS
    np.testing.assert_array_equal(runs["held"], seen["flower"]["after"])  # the configured defence's, kept
