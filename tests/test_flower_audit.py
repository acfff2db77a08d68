"""The attribute audit on the Flower engine gives the in-process engine's privacy table.

One Flower run for the module (`fedunlearn run --engine flower`, 8 clients, 2 rounds, audit on,
AttrCloak-DF for 3 steps on the clients) and the same command on the in-process engine. Before the
defence the two engines hold bit-identical embeddings, so those rows must be equal. After it, the
Flower defence's inputs are SecAgg+ sums, so the embeddings agree to 1e-4 (the tolerance of
tests/test_flower_defence.py); the table, computed from them, must agree to that tolerance too.

The auditor reads the user parts through `query.audit_users`, the simulation's measurement oracle:
its replies are the only ones that may carry an embedding, and only this run asks for them."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import TINY, assert_privacy_tables_match, assert_vectors_absent, run_cli

from clients.messages import AUDIT_USERS
from fedunlearn.progress import Progress

pytestmark = [pytest.mark.flower, pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]

CLIENTS = 8
SETTINGS = TINY + [
    f"data.synthetic_users={CLIENTS}",
    "train.rounds=2",
    "eval.every=2",
    "audit.enabled=true",
    'audit.attributes=["gender", "age"]',
    "defence.method=attrcloak-df",
    "defence.steps=3",
    "defence.cloak_stop=steps",  # 3 steps: on 8 clients gender sits at its null level already
    "defence.lr=0.05",
]
TOLERANCE = 1e-4  # after the defence: SecAgg+ rounding carried through 3 AttrCloak steps
KEYS = ["defence", "view", "attacker", "attribute", "audit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import server.simulation

    pools = []
    run_flower = server.simulation.run_flower

    def keeping_replies(config, **kwargs):
        result, pool = run_flower(config, keep_replies=True, **kwargs)
        pools.append(pool)
        return result, pool

    shown = []
    show = Progress._show

    def recording(self):
        shown.append((self.phase, self.work, self.done, self.clients))
        show(self)

    folder = tmp_path_factory.mktemp("audit")
    unaudited = [setting for setting in SETTINGS if not setting.startswith("audit.enabled")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server.simulation, "run_flower", keeping_replies)
        patch.setattr(Progress, "_show", recording)
        flower = run_cli(SETTINGS, "flower", folder / "flower")
        defended = run_cli(unaudited, "flower", folder / "defended")  # a defence, no audit
    return {
        "flower": flower, "inprocess": run_cli(SETTINGS, "inprocess", folder / "inprocess"), "pool": pools[0],
        "defended": defended, "defended_pool": pools[1], "shown": shown,
    }  # fmt: skip


def test_the_defence_on_the_clients_counts_its_steps_with_or_without_the_audit(runs):
    """The defence without an audit ran with no phase on the bar at all (minutes of SecAgg+ sums)."""
    counted = {}
    for phase, work, done, most in runs["shown"]:
        if work == "defence step" and phase:
            assert most == 3 and done <= most
            counted[phase] = done
    audit = pd.read_csv(runs["flower"] / "audit.csv")
    taken = int(audit[audit["defence"] == "attrcloak-df"]["steps"].iloc[0])  # stopped at its null level
    assert counted == {
        "privacy: attrcloak-df on 8 clients, then its audit": taken,
        "defence: attrcloak-df on the clients (no audit asked)": taken,  # the same data, the same stop
    }


def test_the_flower_privacy_table_equals_the_inprocess_one(runs):
    flower = assert_privacy_tables_match(runs["flower"], runs["inprocess"], TOLERANCE)
    assert list(flower["defence"].unique()) == ["none", "attrcloak-df"]
    assert set(flower["audit"]) == {"global", "local"}
    assert set(flower["view"]) == {"embedding", "upload", "upload-direction", "upload-items"}

    seen = {engine: np.load(runs[engine] / "central_view_embeddings.npz") for engine in ("flower", "inprocess")}
    np.testing.assert_array_equal(seen["flower"]["before"], seen["inprocess"]["before"])
    gap = np.abs(seen["flower"]["after"] - seen["inprocess"]["after"]).max()
    print(f"defended embeddings, Flower vs in-process: {gap:.2e}")
    assert 0 < gap < TOLERANCE
    assert np.abs(seen["flower"]["after"] - seen["flower"]["before"]).max() > 100 * TOLERANCE  # the defence moved


def test_the_results_folder_has_the_same_files_and_privacy_info(runs):
    files = {engine: sorted(p.name for p in runs[engine].iterdir()) for engine in ("flower", "inprocess")}
    assert files["flower"] == files["inprocess"]
    assert {"audit.csv", "audit.md", "central_view_embeddings.npz", "tradeoff.png"} <= set(files["flower"])
    final = {engine: json.loads((runs[engine] / "final.json").read_text()) for engine in ("flower", "inprocess")}
    assert final["flower"]["engine"] == "flower" and final["flower"].keys() == final["inprocess"].keys()
    assert final["flower"]["defending_clients"] == final["inprocess"]["defending_clients"] == CLIENTS
    assert final["flower"]["defence_seconds"] > 0


def test_only_the_audit_query_replies_carry_a_user_part(runs):
    pool = runs["pool"]
    seen = np.load(runs["flower"] / "central_view_embeddings.npz")
    vectors = [*seen["before"], *seen["after"]]
    audit = [c for c, kind in zip(pool.replies_seen, pool.reply_types, strict=True) if kind == AUDIT_USERS]
    others = [c for c, kind in zip(pool.replies_seen, pool.reply_types, strict=True) if kind != AUDIT_USERS]
    assert len(audit) == 2 * CLIENTS  # before the defence and after it, once per client
    assert all(set(content.keys()) == {"user", "meta"} for content in audit)
    assert len(others) > 0
    for content in others:
        assert "user" not in content
        assert_vectors_absent(content, np.stack(vectors))


def test_a_defence_without_the_audit_sends_no_audit_query_and_reads_no_user_part_back(runs):
    pool, folder = runs["defended_pool"], runs["defended"]
    assert AUDIT_USERS not in pool.reply_types and len(pool.reply_types) > 0
    seen = np.load(runs["flower"] / "central_view_embeddings.npz")  # the audited twin's embeddings (same seed)
    for content in pool.replies_seen:
        assert "user" not in content
        assert_vectors_absent(content, np.stack([*seen["before"], *seen["after"]]))
    assert not (folder / "audit.csv").exists() and not (folder / "central_view_embeddings.npz").exists()
    defence = json.loads((folder / "final.json").read_text())["defence"]
    assert defence["method"] == "attrcloak-df" and defence["defending_clients"] == CLIENTS
    audited = pd.read_csv(runs["flower"] / "audit.csv")  # the same defence, audited: the same quality after it
    row = audited[audited["defence"] == "attrcloak-df"].iloc[0]
    assert defence["HR@10"] == pytest.approx(row["HR@10"], abs=1e-9)
    assert defence["NDCG@10"] == pytest.approx(row["NDCG@10"], abs=1e-9)
    assert defence["HR@10_before"] == pytest.approx(audited[audited["defence"] == "none"].iloc[0]["HR@10"], abs=1e-9)
