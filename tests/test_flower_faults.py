"""Faulty Flower clients: a client that raises, times out, spoofs another's id or sends NaN is
dropped from its round and counted, and the run goes on with the numbers of the in-process run
whose faulty clients failed the same way."""

import numpy as np
import pytest
from helpers import TINY, run_as_the_runner_does

from fedunlearn.config import load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl.faults import fault_of
from fedunlearn.fl.federation import build_federation
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server

SETTINGS = TINY + ["train.rounds=3", "eval.every=1", "faults.share=0.2", "train.reply_timeout=10"]
FLOWER_KINDS = ["exception", "timeout", "spoof_id", "nan"]
# a client that raises keeps nothing of the round on every engine; one whose reply comes too late
# has kept its new user part, as one whose upload is rejected for a NaN
INPROCESS_KINDS = ["exception", "nan", "spoof_id", "nan"]


def _config(kinds, engine):
    return load_config(None, SETTINGS + [f"faults.kinds={kinds}".replace("'", '"'), f"run.engine={engine}"])


@pytest.mark.flower
def test_faulty_flower_clients_are_counted_and_the_run_matches_the_inprocess_one():
    from server.simulation import run_flower

    config = _config(FLOWER_KINDS, "flower")
    federation = build_federation(config.data, config.run.seed)
    drawn = [fault_of(config.faults, 0, r, c) for r in range(1, 4) for c in federation.client_ids]
    assert {"spoof_id", "timeout", "exception", "nan"} <= set(drawn)  # the test sees each kind
    # Flower's simulation may hand a slow client's next message to another worker with its old
    # state, so the one late reply is drawn in the last round: its evaluation is all it can change
    late = [r for r in range(1, 4) for c in federation.client_ids if fault_of(config.faults, 0, r, c) == "timeout"]
    assert late == [3]

    reference = _config(INPROCESS_KINDS, "inprocess")
    pool = InProcessPool(reference, federation)
    expected = run_as_the_runner_does(federated_server(reference, federation, pool, Progress(1, False)), pool)
    result, _ = run_flower(config, show_progress=False)
    counts = {kind: drawn.count(kind) for kind in FLOWER_KINDS if kind in drawn}
    assert result.rejected["updates"] == counts  # spoof_id caught by the node map, not the claimed id
    assert expected.rejected["updates"]["nan"] == counts.get("nan", 0) + counts["timeout"]
    assert [row["HR@10"] for row in result.rounds[:-1]] == [row["HR@10"] for row in expected.rounds[:-1]]
    for key in expected.shared:
        np.testing.assert_array_equal(result.shared[key], expected.shared[key])
