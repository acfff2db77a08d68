"""Drop schedules, the update history and the unlearning methods on a small federation."""

from dataclasses import replace

import numpy as np
import pytest

from fedunlearn.config import load_config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.comparison import compare_with_retrain
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.history import HistoryError, HistoryPolicy, HistoryStore, _decoded_ids, _encoded_ids
from fedunlearn.fl.schedule import build_schedule
from fedunlearn.fl.uploads import gaussian_sigma
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server
from fedunlearn.unlearning.methods import history_policy

SMALL = [
    "data.synthetic_users=24",
    "data.synthetic_items=200",
    "data.synthetic_interactions=12",
    "data.test_negatives=19",
    "model.dim=8",
    "train.rounds=6",
    "eval.every=2",
]
IDS = [str(i) for i in range(24)]


def server_for(tmp_path, overrides, drop=""):
    config = load_config(None, SMALL + overrides)
    federation = build_federation(config.data, config.run.seed)
    schedule = build_schedule(drop, "", federation.client_ids, config.train.rounds, config.run.seed)
    policy = history_policy(config.unlearn)
    history = HistoryStore(tmp_path / f"h{len(list(tmp_path.iterdir()))}.sqlite", policy)
    pool = InProcessPool(config, federation)
    server = federated_server(config, federation, pool, Progress(1, False), history, schedule)
    return server, history, pool


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("99@3", "no client '99'"),
        ("3@7", "use a round from 2 to train.rounds (6)"),
        ("3@1", "use a round from 2 to train.rounds (6)"),
        ("3,4@3;4@5", "client '4' is dropped twice"),
        ("3,4", "cannot read drop event '3,4'"),
        ("3@x", "cannot read drop event '3@x'"),
        (",@3", "empty client id"),
        (";".join(f"{c}@3" for c in IDS), "removes all 24 clients"),
    ],
)
def test_bad_schedules_give_one_line_errors(drop, message):
    with pytest.raises(FedUnlearnError) as err:
        build_schedule(drop, "", IDS, 6, 0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_random_drops_are_seeded_and_avoid_clients_already_leaving():
    first = build_schedule("3@4", "10%@4", IDS, 6, seed=1)
    assert first == build_schedule("3@4", "10%@4", IDS, 6, seed=1)
    assert len(first[4]) == 1 + 3 and first[4].count("3") == 1
    assert build_schedule("", "10%@4", IDS, 6, seed=2) != build_schedule("", "10%@4", IDS, 6, seed=1)
    with pytest.raises(FedUnlearnError, match="cannot read random drop"):
        build_schedule("", "ten@4", IDS, 6, 0)


def test_federaser_calibrated_updates_carry_the_stored_step_sizes(tmp_path):
    # SGD: an Adam first step is lr * sign(gradient), which would hide whether training really reran
    server, history, _ = server_for(tmp_path, ["unlearn.method=federaser", "train.optimizer=sgd"], drop="3,7@6")
    history.policy.full_updates = "every"  # FedEraser reads the later ones' sizes only: kept here to compare
    stored = {}
    original_remove = server.remove

    def remember_then_remove(round_number, leaving):
        for checkpoint in history.checkpoint_rounds():
            for client in history.participants(checkpoint):
                stored[(checkpoint, client)] = (history.sizes(checkpoint, client), history.update(checkpoint, client))
        original_remove(round_number, leaving)

    server.remove = remember_then_remove
    server.run()
    assert {c for c, _ in server.calibrations} == {3, 5}  # checkpoints after the first, before round 6
    assert len(server.calibrations) == 2 * 22  # every retained participant, at each of them
    for checkpoint, update in server.calibrations:
        assert update.client_id not in {"3", "7"}
        sizes, original = stored[(checkpoint, update.client_id)]
        for key, value in update.rows.items():  # per changed row: the RMS of the rows' norms
            assert np.sqrt((value.astype(np.float64) ** 2).sum(axis=1).mean()) == pytest.approx(sizes[key], rel=1e-5)
            stored_rows = original.rows[key].astype(np.float64)
            # sizes are taken before storage; the stored rows are int8 (within max |row| / 254 per value)
            assert sizes[key] == pytest.approx(np.sqrt((stored_rows**2).sum(axis=1).mean()), rel=5e-3)
        # the direction really comes from new training, not from the stored update
        # same round, same client draws: half an epoch touches a subset of the original rows
        assert set(update.item_ids) < set(original.item_ids)
        mine = np.isin(original.item_ids, update.item_ids)
        change = np.abs(update.rows["item_emb"] - original.rows["item_emb"][mine]).max()
        assert change > 1e-3 * np.abs(original.rows["item_emb"]).max()


def test_history_lookups_never_fall_back(tmp_path):
    server, history, _ = server_for(tmp_path, [])
    server.run()
    assert history.sizes(1, "5")  # keyed by the stable client id
    with pytest.raises(HistoryError, match="client 17 at round 2"):
        history.update(2, "17")  # round 2 is not a checkpoint round: nothing stored, and it says so
    with pytest.raises(HistoryError, match="client nobody"):
        history.sizes(1, "nobody")


@pytest.mark.parametrize("method", ["retrain", "federaser", "fru", "accum", "ascent", "none"])
def test_no_trace_of_removed_clients_remains(tmp_path, method):
    server, history, pool = server_for(tmp_path, [f"unlearn.method={method}"], drop="3,7@4")
    result = server.run()
    assert not {"3", "7"} & history.client_ids()
    assert 3 not in pool.user_state and 7 not in pool.user_state
    assert {3, 7}.isdisjoint(server.active)
    assert result.events[0]["clients"] == ["3", "7"] and result.events[0]["method"] == method
    assert result.final["round"] == 6
    # vacuumed: no free pages are left that could still hold their deleted rows
    assert history.db.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_a_round_kept_in_full_is_not_stored_again_in_compact_form(tmp_path):
    """FedEraser's full updates and FRU's compact ones, kept together (unlearn.compare): at a round
    kept in full the compact form is read off the full one, equal to what storing it gave."""
    server, history, _ = server_for(tmp_path, ["unlearn.compare=true"])
    server.run()  # no drop: the history keeps every round
    alone = HistoryStore(tmp_path / "alone.sqlite", replace(history.policy, full_updates="none"))
    kinds = history.db.execute("SELECT round, kind FROM round_updates ORDER BY round, kind").fetchall()
    assert [r for r, kind in kinds if kind == "compact"] == [2, 4, 6]  # the odd rounds are kept in full
    assert [r for r, kind in kinds if kind == "full"] == [1, 3, 5]
    ids = sorted(history.participants(3))
    full = history.updates(3, ids)
    alone.record_round(3, server.shared, full)  # these updates stored alone, in compact form only
    derived, kept = history.compacts(3, ids), alone.compacts(3, ids)
    assert derived.clients == kept.clients and np.array_equal(derived.item_ids, kept.item_ids)
    for key in derived.rows:
        np.testing.assert_array_equal(derived.rows[key], kept.rows[key])


def test_a_history_left_with_deleted_rows_by_a_killed_run_is_compacted_when_reopened(tmp_path):
    """Deleted rows are not zeroed in place (secure_delete off: it doubled the bytes written); the
    VACUUM after the commit removes them, and if a run died before it, reopening does."""
    history = HistoryStore(tmp_path / "h.sqlite", HistoryPolicy())
    with history.transaction():
        history.db.execute("CREATE TABLE kept (data BLOB)")
        history.db.executemany("INSERT INTO kept VALUES (?)", [(b"client-7" * 4000,)] * 20)
    with history.transaction():
        history.db.execute("DELETE FROM kept")  # as a forget() whose VACUUM never ran
    assert history.db.execute("PRAGMA freelist_count").fetchone()[0] > 0
    history.close()
    assert b"client-7" in history.path.read_bytes()  # not zeroed in place: the free pages still hold them
    reopened = HistoryStore(history.path, history.policy)
    assert reopened.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert b"client-7" not in history.path.read_bytes()


def test_a_run_killed_during_its_compaction_compacts_when_reopened_though_no_page_is_free(tmp_path):
    """Deleted small rows stay as cells inside live pages (no free page is left), and VACUUM runs
    after the commit: a kill before or during it left a finished run's history holding the removed
    clients' ids and stored step sizes. The commit now records that a compaction is owed."""
    history = HistoryStore(tmp_path / "h.sqlite", HistoryPolicy())
    with history.transaction():
        history.db.executemany("INSERT INTO sizes VALUES (?, ?, ?, ?)",
                               [(1, f"QZ{c}QZ", "item_emb", 0.25) for c in range(40)])  # fmt: skip
    def killed() -> None:
        raise RuntimeError("killed")

    history.compact = killed
    with pytest.raises(RuntimeError, match="killed"):
        with history.transaction():
            history.forget(["QZ7QZ"])  # its VACUUM waits for the commit, and is killed there
    assert history.db.execute("PRAGMA freelist_count").fetchone()[0] == 0  # nothing the old check saw
    history.db.close()
    assert b"QZ7QZ" in history.path.read_bytes()
    reopened = HistoryStore(history.path, history.policy)
    assert b"QZ7QZ" not in history.path.read_bytes() and not reopened.compaction_owed()
    assert reopened.db.execute("SELECT COUNT(*) FROM sizes").fetchone()[0] == 39


def test_a_resume_checkpoint_holds_no_removed_clients_state_after_the_event(tmp_path):
    """The event's round replaces the checkpoint that held the leaving clients' user parts; its
    pages were freed and kept their bytes until the next round's commit, or for good if the run
    ended there. The compaction after the event's commit covers the resume file too."""
    from fedunlearn.fl.checkpoint import RESUME_FILE, Checkpoint

    history = HistoryStore(tmp_path / "h.sqlite", HistoryPolicy())
    checkpoint = Checkpoint(tmp_path, history)
    secret = np.frombuffer(b"QZUSERPARTQZ" * 800, dtype=np.uint8).copy()
    checkpoint.save({"pool.user": secret}, {"round": 1})
    with history.transaction():  # the event's round: the new checkpoint no longer holds that client
        checkpoint.save({"pool.user": np.zeros(16, dtype=np.uint8)}, {"round": 2})
        history.forget(["7"])
    assert b"QZUSERPARTQZ" not in (tmp_path / RESUME_FILE).read_bytes()


def test_a_compared_methods_history_copy_lives_in_memory(tmp_path):
    """The trial copies were files in a temporary folder that kill -9 never cleaned up, holding the
    leaving clients' stored updates after the run had erased them."""
    server, history, _ = server_for(tmp_path, ["unlearn.method=federaser"])
    server.run()
    twin = history.copy_in_memory()
    assert [row[2] for row in twin.db.execute("PRAGMA database_list") if row[1] == "main"] == [""]  # no file
    for table in ("participation", "sizes", "round_updates", "round_tensors", "checkpoints"):
        query = f"SELECT COUNT(*) FROM {table}"
        assert twin.db.execute(query).fetchone() == history.db.execute(query).fetchone(), table
    assert sorted(tmp_path.iterdir()) == [history.path]


def test_retrain_equals_a_fresh_run_configured_without_those_clients(tmp_path):
    dropped, _, _ = server_for(tmp_path, ["unlearn.method=retrain"], drop="3,7@4")
    fresh, _, _ = server_for(tmp_path, ['data.exclude_clients=["3","7"]'])
    with_drop, without = dropped.run(), fresh.run()
    for key in with_drop.shared:
        np.testing.assert_array_equal(with_drop.shared[key], without.shared[key])
    assert {k: v for k, v in with_drop.final.items() if k != "seconds"} == {
        k: v for k, v in without.final.items() if k != "seconds"
    }
    assert with_drop.events[0]["client_epochs"] == 3 * 22  # rounds 1-3 again, 22 clients each


def test_federaser_is_cheaper_than_retrain_and_none_keeps_the_model(tmp_path):
    costs = {}
    for method in ("retrain", "federaser", "none"):
        overrides = [f"unlearn.method={method}", "train.rounds=9", "train.batch_size=1"]
        server, _, _ = server_for(tmp_path, overrides, drop="3@9")
        before = {}
        original = server.remove

        def spy(round_number, leaving, server=server, original=original, before=before):
            before.update(server.shared)
            original(round_number, leaving)
            before["after"] = server.shared

        server.remove = spy
        costs[method] = server.run().events[0]["client_epochs"]
        if method == "none":
            assert all(np.array_equal(before["after"][k], before[k]) for k in before["after"])
    assert costs["retrain"] == 8 * 23
    # checkpoints 3, 5, 7 at half an epoch (counted as minibatches run: 0.5 of an odd count rounds)
    assert costs["federaser"] == pytest.approx(3 * 23 * 0.5, rel=0.08)
    assert costs["none"] == 0


def test_fru_replays_every_round_at_lam_epochs_and_matches_stored_aggregate_norms(tmp_path):
    overrides = ["unlearn.method=fru", "unlearn.lam=0.5", "train.batch_size=1"]
    server, history, _ = server_for(tmp_path, overrides, drop="3@5")
    unlearn, stored = server.unlearn, {}

    def looking_first(round_number, leaving, method=None):  # what the history holds when FRU reads it
        stored["compact"] = history.update(4, "5", "compact").item_ids.size
        with pytest.raises(HistoryError):
            history.update(3, "5", "full")  # no full updates: FRU never reads them
        unlearn(round_number, leaving, method)

    server.unlearn = looking_first
    result = server.run()
    assert result.events[0]["client_epochs"] == pytest.approx(4 * 23 * 0.5, rel=0.08)  # rounds 1-4, half an epoch
    # batch size 1: one optimizer step per example used, half of each retained client's positives
    retained = [i for i in range(24) if server.client_ids[i] != "3"]
    half = sum(max(1, round(0.5 * len(server.pool.federation.client(i).train_items))) for i in retained)
    assert result.events[0]["optimizer_steps"] == 4 * half
    assert stored["compact"] > 0  # FRU's storage: compact updates, every round
    assert history.rounds() == []  # after the last event nothing reads the history: it is deleted
    assert np.isfinite(result.events[0]["MIA_AUC"]) and "HR@10" in result.events[0]["after"]  # measured, not NaN


def test_compacting_keeps_each_clients_rows_that_changed_most():
    from fedunlearn.fl.aggregation import PackedUpdates
    from fedunlearn.fl.updates import ClientUpdate

    rows = np.array([[0.1, 0], [3, 4], [0, 0.2], [1, 1]], np.float32)
    ties = np.array([[1, 0], [0, 1], [0, -1]], np.float32)  # equal norms: the earlier rows stay
    updates = [
        ClientUpdate("b", 3, np.array([1, 4, 6]), {"item_emb": ties}, {}, 0.0),
        ClientUpdate("a", 4, np.array([2, 5, 7, 9]), {"item_emb": rows}, {}, 0.0),
        ClientUpdate("c", 1, np.array([], dtype=np.int64), {"item_emb": np.zeros((0, 2), np.float32)}, {}, 0.0),
        ClientUpdate("d", 1, np.array([8]), {"item_emb": np.array([[0, 0]], np.float32)}, {}, 0.0),
    ]
    kept = PackedUpdates.pack(updates).compacted(alpha=0.5)
    assert kept.clients == ["a", "b", "c", "d"]  # client-id order
    np.testing.assert_array_equal(kept.offsets, [0, 2, 4, 4, 5])  # ceil(alpha x rows), at least one
    np.testing.assert_array_equal(kept.item_ids, [5, 9, 1, 4, 8])
    np.testing.assert_array_equal(kept.rows["item_emb"], np.concatenate([rows[[1, 3]], ties[:2], [[0, 0]]]))
    np.testing.assert_array_equal(kept.touched, [2, 5, 7, 9, 1, 4, 6, 8])  # every touched row stays counted


def test_poisoning_raises_exposure_and_retrain_removes_it(tmp_path):
    exposure = {}
    for method in ("none", "retrain"):
        overrides = [f"unlearn.method={method}", "unlearn.poison=true", "unlearn.target_item=5", "train.rounds=8"]
        overrides += ["unlearn.attackers=[" + ",".join(f'"{c}"' for c in IDS[:6]) + "]"]
        server, _, _ = server_for(tmp_path, overrides, drop=",".join(IDS[:6]) + "@7")
        exposure[method] = server.run().events[0]["after"]["ER@10"]
    assert exposure["none"] > exposure["retrain"] + 0.2  # the attack worked, and Retrain erased it


def test_ascent_steps_stay_inside_the_ball_and_cost_only_the_leaving_clients(tmp_path):
    from fedunlearn.fl.updates import ClientUpdate
    from fedunlearn.unlearning.ascent import project

    step = ClientUpdate("u", 3, np.array([1, 2]), {"item_emb": np.full((2, 2), 3.0, np.float32)}, {}, 0.0)
    bounded = project(step, {"item_emb": 2.0})  # per changed row: each row's norm 3 sqrt(2) -> 2
    np.testing.assert_allclose(np.linalg.norm(bounded.rows["item_emb"], axis=1), [2.0, 2.0], rtol=1e-6)
    assert project(step, {"item_emb": 100.0}).rows["item_emb"][0, 0] == 3.0  # never scaled up

    server, _, pool = server_for(tmp_path, ["unlearn.method=ascent"], drop="3@4")
    server.run()
    assert server.events[0]["client_epochs"] == pytest.approx(1.0)  # one epoch, by the leaving client only


def test_compare_tries_every_method_on_copies_and_leaves_the_run_untouched(tmp_path):
    from fedunlearn.unlearning.registry import METHODS

    plain, _, _ = server_for(tmp_path, ["unlearn.method=federaser", "unlearn.alpha=0.5"], drop="3,7@4")
    plain.history.policy.compact = True
    compared, _, _ = server_for(tmp_path, ["unlearn.method=federaser", "unlearn.compare=true"], drop="3,7@4")
    compared.history.policy.compact = True
    expected, result = plain.run(), compared.run()
    assert [row["method"] for row in result.comparison] == list(METHODS)
    rows = {row["method"]: row for row in result.comparison}
    assert rows["retrain"]["speedup"] == 1.0 and rows["retrain"]["L2_to_retrain"] == 0.0
    assert rows["federaser"]["HR@10"] == expected.events[0]["after"]["HR@10"]  # same as the real removal
    assert rows["none"]["client_epochs"] == 0.0
    for key in expected.shared:  # trying the others on copies changed nothing in the run itself
        np.testing.assert_array_equal(result.shared[key], expected.shared[key])


def test_every_method_module_is_registered_and_every_registered_method_loads():
    """Adding a method is one file plus one registry line: a file left unregistered, or a line
    naming no function, fails here."""
    from pathlib import Path

    import fedunlearn.unlearning as package
    from fedunlearn.unlearning.methods import load_methods
    from fedunlearn.unlearning.registry import METHODS

    machinery = {"__init__", "context", "registry", "methods"}
    modules = {path.stem for path in Path(package.__file__).parent.glob("*.py")} - machinery
    assert {entry.function.split(":")[0].rsplit(".", 1)[1] for entry in METHODS.values()} == modules
    loaded = load_methods()
    assert list(loaded) == list(METHODS)
    assert all(callable(function) and function.__name__ == name for name, function in loaded.items())


def test_the_history_keeps_only_what_the_method_reads(tmp_path):
    sizes = {}
    for method in ("retrain", "federaser", "fru"):
        server, history, _ = server_for(tmp_path, [f"unlearn.method={method}"], drop="3@5")
        sizes[method] = server.run().events[0]["history_bytes"]  # what the event had to read
    assert sizes["retrain"]["checkpoints"] == sizes["retrain"]["full"] == sizes["retrain"]["compact"] == 0
    assert sizes["federaser"]["full"] > 0 and sizes["federaser"]["compact"] == 0
    assert sizes["fru"]["compact"] > 0 and sizes["fru"]["full"] == 0 and sizes["fru"]["checkpoints"] > 0
    assert sizes["retrain"]["every_full_update"] > sizes["federaser"]["total"] > sizes["retrain"]["total"] > 0
    for method, size in sizes.items():  # the file holds who took part, ids, keys and indexes besides the arrays
        assert size["file"] > size["total"] + 4096, method


def test_federaser_keeps_full_updates_of_the_first_checkpoint_only_and_unlearns_the_same(tmp_path):
    # two events: the first rewrites the history (calibrated sizes), the second reads it
    runs = {}
    for kept in ("first", "every"):
        server, history, _ = server_for(tmp_path, ["unlearn.method=federaser"], drop="3@4;7@6")
        history.policy.full_updates = kept
        runs[kept] = server.run()
    for key in runs["first"].shared:
        np.testing.assert_array_equal(runs["first"].shared[key], runs["every"].shared[key])
    # at the second event: round 1's updates against those of rounds 1, 3 and 5
    first, every = (run.events[1]["history_bytes"]["full"] for run in runs.values())
    assert 2.5 * first < every < 3.5 * first


def test_fru_rewrites_its_history_so_a_later_removal_rolls_back_to_a_model_without_them(tmp_path):
    overrides = ["unlearn.method=fru", "train.fraction=0.5", "unlearn.dt=2", "unlearn.alpha=0.5", "train.rounds=8"]
    server, history, _ = server_for(tmp_path, overrides, drop="3@6;7@8")
    replayed, train = {}, server.train_clients

    def recording(round_number, clients, shared, epochs=None, ascent=False):
        if epochs is not None and server.handled == 6:  # the first event's replay: the model it trains from
            replayed[round_number] = {key: value.copy() for key, value in shared.items()}
        return train(round_number, clients, shared, epochs, ascent)

    server.train_clients = recording
    original, left, took_part = {}, {}, {}
    remove = server.remove

    def looking_around(round_number, leaving):
        if round_number == 6:  # before the first removal
            original.update({c: history.checkpoint(c) for c in history.checkpoint_rounds()})
        else:  # what the first removal left for the second to read
            left.update({c: history.checkpoint(c) for c in history.checkpoint_rounds()})
            took_part.update({r: history.participants(r) for r in replayed})
        remove(round_number, leaving)

    server.remove = looking_around
    server.run()
    rewritten = [c for c in left if c in replayed and c > min(replayed)]
    assert rewritten  # checkpoints after the rollback point, before the first event
    for c in rewritten:
        for key, value in replayed[c].items():
            np.testing.assert_array_equal(left[c][key], value)  # the replay's model, stored
            assert not np.array_equal(value, original[c][key])  # not the one that held client 3
    for r in replayed:  # the stored updates are the replay's, without client 3
        assert took_part[r] and "3" not in took_part[r]
    assert history.rounds() == [] and history.checkpoint_rounds() == []  # nothing is read after the last event


def test_removing_clients_that_never_trained_changes_nothing_for_every_method(tmp_path):
    config = load_config(None, SMALL + ["train.fraction=0.3"])
    federation = build_federation(config.data, config.run.seed)
    from fedunlearn.fl.rounds import sample_clients

    sampled = {i for r in range(1, 5) for i in sample_clients(config.run.seed, r, federation.client_ids, 0.3)}
    idle = [federation.client_ids[i] for i in range(federation.n_clients) if i not in sampled][:2]
    assert idle  # clients never sampled in rounds 1-4
    overrides = ["train.fraction=0.3", "unlearn.method=federaser", "unlearn.compare=true"]
    server, _, _ = server_for(tmp_path, overrides, drop=f"{','.join(idle)}@5")
    trained = {}
    compare = server.compare_methods  # runs first at the event: the model as trained so far

    def keep_trained(round_number, leaving):
        trained.update({key: value.copy() for key, value in server.shared.items()})
        return compare(round_number, leaving)

    server.compare_methods = keep_trained
    result = server.run()
    assert {row["method"]: row["L2_to_retrain"] for row in result.comparison} == dict.fromkeys(
        ("retrain", "federaser", "fru", "accum", "ascent", "none"), 0.0
    )
    for key, value in trained.items():
        np.testing.assert_array_equal(result.unlearned[key], value)  # the model right after == before


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_fru_replay_that_reproduces_the_stored_updates_takes_exactly_the_stored_step(tmp_path, model):
    from fedunlearn.unlearning.fru import replay_step

    overrides = [f"model.name={model}", "unlearn.compare=true", "train.rounds=4", "unlearn.alpha=0.5"]
    overrides += ["unlearn.history_dtype=float32"]  # float16 rounding could reorder near-equal rows
    server, history, _ = server_for(tmp_path, overrides)  # compare: full and compact updates both kept
    server.run()
    shared, clients = history.checkpoint(3), list(history.participants(3))
    full = [history.update(3, client) for client in clients]
    step, scale = replay_step(server, shared, full, history.compacts(3, clients))
    stored_step = server.aggregate_delta(shared, full)
    assert scale == pytest.approx(dict.fromkeys(server.model.row_keys, 1.0), rel=1e-9)
    for key, value in stored_step.items():
        assert np.linalg.norm(step[key]) == pytest.approx(np.linalg.norm(value), rel=1e-9)


def test_fru_dense_layers_take_the_stored_aggregate_not_the_replays_rescaled_direction(tmp_path):
    from dataclasses import replace

    from fedunlearn.unlearning.fru import replay_step

    overrides = ["model.name=ncf", "unlearn.compare=true", "train.rounds=4", "unlearn.history_dtype=float32"]
    server, history, _ = server_for(tmp_path, overrides)
    server.run()
    shared, clients = history.checkpoint(3), list(history.participants(3))
    full = [history.update(3, client) for client in clients]
    rng = np.random.default_rng(0)
    noisy = [  # the stored item rows, dense updates that point anywhere (a short replay's minibatch noise)
        replace(u, dense={key: rng.standard_normal(value.shape).astype(np.float32) for key, value in u.dense.items()})
        for u in full
    ]
    step, _ = replay_step(server, shared, noisy, history.compacts(3, clients))
    stored_step = server.aggregate_delta(shared, full)
    assert server.model.dense_keys(shared)
    for key, value in stored_step.items():  # dense: the stored aggregate; rows: their own, unscaled
        np.testing.assert_allclose(step[key], value, rtol=1e-9, atol=1e-12)


def test_fru_keeps_each_replayed_clients_stored_dense_update_in_the_rewritten_history(tmp_path):
    overrides = ["model.name=ncf", "unlearn.method=fru", "train.rounds=6", "unlearn.dt=2"]
    overrides += ["unlearn.history_dtype=float32"]
    server, history, _ = server_for(tmp_path, overrides, drop="3@4;7@6")
    before, after = {}, {}
    remove = server.remove

    def looking_around(round_number, leaving):
        seen = before if round_number == 4 else after
        seen.update({r: history.compacts(r, [c for c in history.participants(r) if c not in ("3", "7")])
                     for r in history.rounds() if r < 4})  # fmt: skip
        remove(round_number, leaving)

    server.remove = looking_around
    server.run()
    for r, stored in before.items():
        rewritten = after[r]
        assert rewritten.clients == stored.clients
        for key, value in stored.dense.items():
            np.testing.assert_array_equal(rewritten.dense[key], value)
        assert any(not np.array_equal(rewritten.rows[key], value) for key, value in stored.rows.items())


def test_a_compact_row_is_averaged_over_every_client_that_touched_it():
    from fedunlearn.config import ModelConfig
    from fedunlearn.fl.aggregation import aggregate_delta
    from fedunlearn.fl.updates import ClientUpdate
    from fedunlearn.models import build_model

    model = build_model(ModelConfig(dim=2), 3)
    shared = {"item_emb": np.zeros((3, 2), np.float32)}
    kept = ClientUpdate("a", 1, np.array([0]), {"item_emb": np.array([[4.0, 0.0]], np.float32)}, {}, 0.0)
    other = ClientUpdate("b", 3, np.array([1]), {"item_emb": np.array([[0.0, 2.0]], np.float32)}, {}, 0.0)
    # "b" touched rows 0 and 1 but kept only row 1: row 0's mean is 1 * 4 / (1 + 3), not 4
    delta = aggregate_delta(model, shared, [kept, other], 1.0, touched=[np.array([0]), np.array([0, 1])])
    np.testing.assert_allclose(delta["item_emb"], [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])


def test_repeated_events_give_one_block_each_and_retrain_forgets_every_removal_so_far(tmp_path):
    overrides = ["unlearn.method=federaser", "unlearn.compare=true"]
    server, _, _ = server_for(tmp_path, overrides, drop="3@3;7@5")
    rows = server.run().comparison
    assert [(row["event"], row["removed"]) for row in rows if row["method"] == "retrain"] == [(3, 1), (5, 2)]
    assert len(rows) == 2 * len({row["method"] for row in rows})
    fresh, _, _ = server_for(tmp_path, ['data.exclude_clients=["3","7"]', "train.rounds=4"])
    without_both = fresh.run().final  # rounds 1-4 never seeing either client, evaluated on the others
    retrain = next(row for row in rows if row["method"] == "retrain" and row["event"] == 5)
    assert retrain["HR@10"] == without_both["HR@10"] and retrain["NDCG@10"] == without_both["NDCG@10"]
    later = {row["method"]: row for row in rows if row["event"] == 5}  # judged against that Retrain
    assert later["federaser"]["client_epochs"] < later["retrain"]["client_epochs"] == 4 * 22


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-3), ("int8", 1 / 127)])
def test_stored_updates_come_back_within_their_dtypes_rounding(tmp_path, dtype, tolerance):
    overrides = ["model.name=ncf", "unlearn.method=federaser", f"unlearn.history_dtype={dtype}", "train.rounds=1"]
    server, history, _ = server_for(tmp_path, overrides)
    sent = {}
    record = history.record_round

    def keeping(round_number, shared, updates):
        sent.update({u.client_id: u for u in updates})
        record(round_number, shared, updates)

    history.record_round = keeping
    server.run()
    for client, update in sent.items():
        stored = history.update(1, client)
        np.testing.assert_array_equal(stored.item_ids, update.item_ids)
        for key, value in {**update.rows, **update.dense}.items():
            back = stored.rows[key] if key in stored.rows else stored.dense[key]
            # int8: within half a step of max |row| / 127 per row (per client for dense layers)
            axes = tuple(range(1, value.ndim)) if key in update.rows else None
            bound = tolerance * np.abs(value).max(axis=axes, keepdims=axes is not None) + 1e-12
            assert (np.abs(back - value) <= bound).all()
    assert history.bytes_by_kind()["full"] > 0


@pytest.mark.parametrize(
    ("ids", "offsets", "stored_as"),
    [
        ([0, 3, 9, 2, 3, 5, 6, 7, 8, 11, 12, 13, 15], [0, 3, 3, 13], "ids.touched.bitmap"),  # rising, 1 empty
        ([0, 9, 3, 2, 3], [0, 3, 5], "ids.touched"),  # one client's ids not rising: a bitmap would reorder them
        ([5, 70_000], [0, 1, 2], "ids.touched"),  # a wide catalogue and few ids: the uint32 ids are smaller
    ],
)
def test_stored_item_ids_come_back_exactly_in_the_smaller_form(ids, offsets, stored_as):
    ids, offsets = np.array(ids, dtype=np.int64), np.array(offsets, dtype=np.int64)
    name, stored = _encoded_ids("ids.touched", ids, offsets)
    assert name == stored_as
    np.testing.assert_array_equal(_decoded_ids({name: stored}, "ids.touched", offsets), ids)
    damaged = np.array([0, 3, 4, 13], dtype=np.int64)  # row counts that disagree with the bitmap
    if name.endswith(".bitmap"):
        with pytest.raises(HistoryError, match="damaged"):
            _decoded_ids({name: stored}, "ids.touched", damaged)


def test_the_history_stops_at_the_last_drop_event_and_the_last_event_writes_none(tmp_path):
    server, history, _ = server_for(tmp_path, ["unlearn.method=federaser"], drop="3@3;7@5")
    held, writes, unlearn = {}, [], server.unlearn

    def looking_first(round_number, leaving, method=None):
        held[round_number] = (history.rounds(), history.checkpoint_rounds())
        unlearn(round_number, leaving, method)

    server.unlearn = looking_first
    replace = history.replace_updates
    history.replace_updates = lambda number, updates: writes.append(number) or replace(number, updates)
    server.run()  # rounds 5 and 6 train after the last event: no method will read them
    assert held == {3: ([1, 2], [1]), 5: ([1, 2, 3, 4], [1, 3])}
    assert writes == []  # event 3 reuses checkpoint 1's stored updates; event 5 calibrates checkpoint 3 unstored
    assert history.rounds() == [] and history.checkpoint_rounds() == []  # after the last event, deleted


def test_an_attacker_whose_training_missed_the_target_boosts_nothing():
    from fedunlearn.fl.client import boost_target

    rows = {"item_emb": np.ones((2, 2), np.float32)}
    boost_target(rows, np.array([3, 5]), target=9, boost=30.0)  # past every touched row
    boost_target(rows, np.array([3, 5]), target=4, boost=30.0)  # between two: row 5 is not the target
    np.testing.assert_array_equal(rows["item_emb"], np.ones((2, 2)))
    boost_target(rows, np.array([3, 5]), target=5, boost=30.0)
    np.testing.assert_array_equal(rows["item_emb"], [[1, 1], [30, 30]])


def test_a_history_in_the_old_layout_is_refused_not_half_read(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.execute("CREATE TABLE update_tensors (round INTEGER, client_id TEXT, kind TEXT, tensor TEXT, data BLOB)")
    old.close()
    with pytest.raises(FedUnlearnError, match="older fedunlearn.*without --resume"):
        HistoryStore(tmp_path / "old.sqlite", HistoryPolicy())
    old = sqlite3.connect(tmp_path / "ids.sqlite")  # ids as int32 columns (before they moved to round_tensors)
    old.execute("CREATE TABLE round_updates (round INTEGER, kind TEXT, clients TEXT, item_ids BLOB)")
    old.close()
    with pytest.raises(FedUnlearnError, match="older fedunlearn.*without --resume"):
        HistoryStore(tmp_path / "ids.sqlite", HistoryPolicy())


def test_no_wall_time_speedup_is_taken_over_an_event_that_is_only_bookkeeping():
    base = {"model": "mf", "seed": 0, "event": 10, "client_epochs": 0.0, "optimizer_steps": 0}
    rows = [
        base | {"method": "retrain", "client_epochs": 90.0, "optimizer_steps": 180, "unlearn_seconds": 13.0},
        base | {"method": "none", "unlearn_seconds": 0.013},  # a no-op: timer noise and bookkeeping
        base | {"method": "accum", "unlearn_seconds": 2.6},  # replays stored updates: real work
    ]
    compare_with_retrain(rows, [None, None, None])
    assert np.isnan(rows[1]["speedup_time"]) and np.isnan(rows[1]["speedup"])
    assert rows[2]["speedup_time"] == pytest.approx(5.0) and np.isnan(rows[2]["speedup"])
    quick = [row | {"unlearn_seconds": 0.05} if row["method"] == "retrain" else dict(row) for row in rows]
    compare_with_retrain(quick, [None, None, None])  # a Retrain of bookkeeping time measures nothing either
    assert np.isnan(quick[2]["speedup_time"]) and np.isnan(quick[0]["speedup_time"])


def test_train_seed_redraws_training_and_keeps_the_drops(tmp_path):
    from fedunlearn.runs.runner import execute

    settings = [*SMALL, 'unlearn.drop_random="25%@3"', "unlearn.method=retrain", "run.engine=inprocess"]
    outcomes = {}
    for name, extra in (("default", []), ("same", ["run.train_seed=0"]), ("other", ["run.train_seed=7"])):
        (tmp_path / name).mkdir()
        outcomes[name] = execute(load_config(None, settings + extra), tmp_path / name, show_progress=False).result
    dropped = {name: [event["clients"] for event in result.events] for name, result in outcomes.items()}
    assert dropped["default"] == dropped["same"] == dropped["other"] and dropped["default"][0]
    timeless = {name: {k: v for k, v in result.final.items() if k != "seconds"} for name, result in outcomes.items()}
    assert timeless["same"] == timeless["default"]  # train_seed = run.seed: the same run
    assert outcomes["other"].final["HR@10"] != outcomes["default"].final["HR@10"] or any(
        not np.array_equal(outcomes["other"].shared[key], value) for key, value in outcomes["default"].shared.items()
    )


def test_fru_rewrites_a_checkpoint_whose_round_lost_every_participant_to_an_earlier_removal(tmp_path):
    """Round 5's only participant (client 10) leaves at round 8, so round 5 keeps a checkpoint but no
    participants; the removal at round 10 replays past it and must store its replayed model there,
    or the removal at round 12, rolling back to round 5, restarts from a model that still holds
    client 7's round-4 update (the bug: only rounds with participants were rewritten)."""
    overrides = ["unlearn.method=fru", "train.fraction=0.08", "unlearn.dt=2", "train.rounds=12"]
    server, history, _ = server_for(tmp_path, overrides, drop="10@8;7@10;8@12")
    replayed, train = {}, server.train_clients

    def recording(round_number, clients, shared, epochs=None, ascent=False):
        if epochs is not None:  # a replay: the model each event's replay trains from, per round
            replayed.setdefault(server.handled, {})[round_number] = {k: v.copy() for k, v in shared.items()}
        return train(round_number, clients, shared, epochs, ascent)

    server.train_clients = recording
    stored, remove = {}, server.remove

    def looking_around(round_number, leaving):
        stored[round_number] = {c: history.checkpoint(c) for c in history.checkpoint_rounds()}
        remove(round_number, leaving)

    server.remove = looking_around
    server.run()
    assert history.participants(5) == [] or 5 not in history.rounds()  # the setting: round 5 lost its only client
    assert 5 in stored[12] and 6 in replayed[10] and 4 in replayed[10]  # event 10 replayed across round 5
    for key, value in stored[12][5].items():  # what event 12 reads at round 5: event 10's replayed model
        np.testing.assert_array_equal(value, replayed[10][6][key])


def test_each_run_is_judged_against_its_own_retrain_and_initial_parameters():
    """An experiment with a second Retrain (other training draws, as the twins experiment) compares
    every method with the Retrain that differs from it only in the method, and Retrain's twin with
    itself; the cosine to Retrain measures moves from the parameters the run really started from
    (its training seed and model.init_std), which a row tells by its `initial`."""
    from fedunlearn.config import derive
    from fedunlearn.fl.comparison import _initial, initial_key, reference_key
    from fedunlearn.models import build_model
    from fedunlearn.seeding import Stream, rng_for

    config = load_config(None, SMALL)
    twin = derive(config, {"run.train_seed": 11})
    federaser = derive(config, {"unlearn.method": "federaser", "unlearn.dt": 3})
    assert reference_key(federaser) == reference_key(config) != reference_key(twin)
    trained_otherwise = [{"defence.upload": "ldp"}, {"defence.ldp_epsilon": 2.0}, {"faults.share": 0.3},
                         {"run.engine": "inprocess"}]  # another engine: another float path  # fmt: skip
    for changed in trained_otherwise:  # they change training: another Retrain is the reference
        assert reference_key(derive(config, changed)) != reference_key(config), changed
    assert reference_key(derive(config, {"defence.method": "attrcloak-dd", "audit.enabled": True})) == (
        reference_key(config)
    )  # after training: the same Retrain
    everyone = derive(config, {"defence.upload": "ldp"})  # who applies an upload defence changes training too
    listed = derive(everyone, {"defence.clients": "listed", "defence.client_ids": ["1"]})
    other = derive(listed, {"defence.client_ids": ["2"]})
    assert len({reference_key(everyone), reference_key(listed), reference_key(other)}) == 3
    assert reference_key(derive(config, {"defence.clients": "listed", "defence.client_ids": ["1"]})) == reference_key(
        config
    )  # no upload defence: whom it would list changes nothing
    base = {"model": "mf", "seed": 0, "event": 4, "optimizer_steps": 10, "unlearn_seconds": 1.0}
    rows = [
        base | {"method": "retrain", "client_epochs": 100.0, "retrain_key": reference_key(config)},
        base | {"method": "retrain", "client_epochs": 80.0, "retrain_key": reference_key(twin)},
        base | {"method": "federaser", "client_epochs": 10.0, "retrain_key": reference_key(federaser)},
    ]
    compare_with_retrain(rows, [None, None, None])
    assert [row["speedup"] for row in rows] == [1.0, 1.0, 10.0]  # not 8.0 against the twin listed last

    drawn = derive(config, {"run.train_seed": 11, "model.init_std": 0.5})
    started = build_model(drawn.model, 200).init_shared(rng_for(11, Stream.SHARED_INIT))
    row = {"model": "mf", "seed": 0, "initial": initial_key(drawn)}
    for key, value in _initial(row, started).items():
        np.testing.assert_array_equal(value, started[key])


def test_accum_leaves_no_stored_model_holding_a_removed_client(tmp_path):
    """FedAccum reads only the first checkpoint, but a later event's history keeps them all: each
    checkpoint after the first is replaced by the model its replay reached (the bug: they stayed,
    each holding the removed client's updates)."""
    overrides = ["unlearn.method=accum", "unlearn.dt=2"]
    server, history, _ = server_for(tmp_path, overrides, drop="3@4;7@6")
    before, after, remove = {}, {}, server.remove

    def looking_around(round_number, leaving):
        if round_number == 4:
            before.update({c: history.checkpoint(c) for c in history.checkpoint_rounds()})
            remove(round_number, leaving)
            after.update({c: history.checkpoint(c) for c in history.checkpoint_rounds()})
        else:
            remove(round_number, leaving)

    server.remove = looking_around
    server.run()
    assert sorted(before) == [1, 3]
    for key, value in before[1].items():  # the initial model holds no one
        np.testing.assert_array_equal(after[1][key], value)
    assert any(not np.array_equal(after[3][key], value) for key, value in before[3].items())


def test_retrain_counts_the_history_it_rewrites_once(tmp_path):
    """Retrain clears the history and records rounds 1..r-1 again without the leaving clients: at
    the next event, what keeping every full update would take is then less than for a run that
    kept them (the bug counted those rounds twice, more)."""
    bytes_at_event = {}
    for method in ("none", "retrain"):
        server, _, _ = server_for(tmp_path, [f"unlearn.method={method}"], drop="3,5@4;7@6")
        result = server.run()
        bytes_at_event[method] = result.events[1]["history_bytes"]["every_full_update"]
    assert 0 < bytes_at_event["retrain"] < bytes_at_event["none"]


def test_stored_updates_never_wrap_or_turn_infinite():
    from fedunlearn.errors import FedUnlearnError
    from fedunlearn.fl.history import _encoded

    (_, stored), (_, scale) = _encoded("rows", np.array([[2e-42, -1e-42]], dtype=np.float32), "int8")
    assert stored[0, 0] > 0 and stored[0, 1] <= 0  # a subnormal scale: clipped to 127, not wrapped to -126
    with pytest.raises(FedUnlearnError, match="beyond float16's range"):
        _encoded("rows", np.array([[7e4, 1.0]], dtype=np.float32), "float16")


@pytest.mark.parametrize("method", ["federaser", "fru"])
def test_a_retained_client_whose_recalibration_was_rejected_leaves_the_rewritten_round(tmp_path, method):
    """At the first event one retained client's calibration / replay reply is lost (as a rejected
    one is): its stored update of that round was trained on the model being erased, so the
    rewritten round must not keep it for the next event (the bug: it stayed beside the new ones)."""
    server, history, _ = server_for(tmp_path, [f"unlearn.method={method}", "unlearn.dt=2"], drop="3@4;7@6")
    train, lost = server.train_clients, "5"

    def losing_one(round_number, clients, shared, epochs=None, ascent=False):
        updates = train(round_number, clients, shared, epochs, ascent)
        if epochs is not None and server.handled == 4:  # the first event's calibration or replay
            updates = [u for u in updates if u.client_id != lost]
        return updates

    server.train_clients = losing_one
    seen, remove = {}, server.remove

    def looking_around(round_number, leaving):
        remove(round_number, leaving)
        if round_number == 4:
            seen.update({r: set(history.participants(r)) for r in history.rounds()})

    server.remove = looking_around
    server.run()
    rewritten = [r for r in seen if r < 4 and (method == "fru" or r in (1, 3)) and r > 1]
    assert rewritten and all(lost not in seen[r] for r in rewritten)
    assert all("3" not in clients for clients in seen.values())


def test_a_compare_table_measures_the_cosine_to_retrain_from_the_run_s_own_start(tmp_path, monkeypatch):
    """`unlearn.compare` rows carried no `initial`, so the cosine to Retrain was taken from
    parameters drawn with run.seed and the default init_std, not the run's (a review: FRU read
    0.984 where the run's own start gives 0.515)."""
    import fedunlearn.fl.rounds as rounds
    from fedunlearn.fl.comparison import _initial, initial_key

    seen = []

    def recording(rows, unlearned, starts=None):
        seen.append((rows, unlearned, starts))
        compare_with_retrain(rows, unlearned, starts)

    monkeypatch.setattr(rounds, "compare_with_retrain", recording)
    overrides = ["unlearn.compare=true", "model.init_std=0.3", "run.train_seed=7", "unlearn.method=federaser"]
    server, _, _ = server_for(tmp_path, overrides, drop="3@4")
    server.run()
    ((rows, unlearned, starts),) = seen
    assert list(starts) == [initial_key(server.config)] and starts[initial_key(server.config)] is server.initial
    assert {row["initial"] for row in rows} == {initial_key(server.config)}
    for key, value in _initial(rows[0], server.initial).items():  # what a re-read of the rows takes
        np.testing.assert_array_equal(value, server.initial[key])
    stale = _initial({"model": "mf", "seed": 0}, server.initial)  # the start the rows implied before
    assert not np.array_equal(stale["item_emb"], server.initial["item_emb"])
    federaser = next(row for row in rows if row["method"] == "federaser")
    retrain = next(i for i, row in enumerate(rows) if row["method"] == "retrain")
    at = rows.index(federaser)
    moved, ref = (np.concatenate([p[k].ravel() - server.initial[k].ravel() for k in sorted(p)])
                  for p in (unlearned[at], unlearned[retrain]))  # fmt: skip
    expected = moved @ ref / (np.linalg.norm(moved) * np.linalg.norm(ref))
    assert federaser["cosine_to_retrain"] == pytest.approx(expected, rel=1e-9)


def test_an_unlearned_model_that_ranks_no_better_than_popularity_is_warned_about(capsys):
    """The collapse issue 12 found on NCF (HR@10 0.05 after FedEraser against Retrain's 0.53) was
    printed as an ordinary row: each event's and each compared method's model is now held against
    the popularity ranker."""
    from fedunlearn.fl.rounds import FederationResult
    from fedunlearn.runs.runner import warn_if_unlearning_collapsed

    result = FederationResult()
    result.events = [{"round": 10, "method": "federaser", "after": {"HR@10": 0.05}}]
    compared = (("retrain", 0.33), ("federaser", 0.05), ("fru", 0.40), ("none", 0.30), ("ascent", 0.35))
    result.comparison = [{"event": 10, "method": m, "HR@10": hr} for m, hr in compared]
    warn_if_unlearning_collapsed(result, popular={10: 0.41})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # the run's own method, compared too, is said once
    assert all(line.startswith("fedunlearn: warning: after the drop before round 10") for line in lines)
    assert [line.split(", ")[1].split("'s")[0] for line in lines] == ["federaser", "fru", "ascent"]  # not Retrain, none
    # each event against popularity over the users retained right after it, not after the last event
    result.events.append({"round": 15, "method": "federaser", "after": {"HR@10": 0.30}})
    result.comparison = [{"event": 15, "method": "fru", "HR@10": 0.30}]
    warn_if_unlearning_collapsed(result, popular={10: 0.04, 15: 0.35})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("round 15" in line and "against 0.3500" in line for line in lines)


def test_removed_clients_leave_no_id_in_the_ldp_counts_or_calibrations_and_trials_spend_nothing(tmp_path):
    """Found by an independent check: the run's LDP count per client kept the removed clients' ids
    (and with them their participation) in the server's state and its resume checkpoint; FedEraser's
    calibrated updates of an earlier event kept clients that left at a later one; and each
    `unlearn.compare` trial's noised uploads were charged to the run (its epsilon rose 33 -> 50)."""
    settings = ["train.fraction=0.5", "defence.upload=ldp", "unlearn.method=federaser", "train.rounds=8"]
    drop = "3,7@4;5,11@7"
    results = {}
    for compare in ("false", "true"):
        server, _, _ = server_for(tmp_path, [*settings, f"unlearn.compare={compare}"], drop=drop)
        counted: dict[str, int] = {}
        original_remove = server.remove

        def count_then_remove(round_number, leaving, server=server, counted=counted):
            counted.update(server.ldp_uploads)  # every count so far, removed clients' too
            original_remove(round_number, leaving)

        server.remove = count_then_remove
        result = server.run()
        results[compare] = (result.ldp_uploads, dict(server.ldp_uploads))
        gone = {"3", "7", "5", "11"}
        assert gone.isdisjoint(server.ldp_uploads)
        assert result.ldp_uploads == max((counted | dict(server.ldp_uploads)).values())
        assert max(counted[c] for c in gone if c in counted) > 0  # the removed clients did upload
        assert server.calibrations and gone.isdisjoint(update.client_id for _, update in server.calibrations)
    assert results["true"] == results["false"]


@pytest.mark.parametrize("engine", ["inprocess", "batched"])
def test_a_second_ldp_upload_of_the_same_round_gets_fresh_noise(tmp_path, engine):
    """Found by an independent check: LDP noise was keyed by (seed, round, client) alone, so a
    calibration, replay or Retrain upload of round r reused round r's noise and the difference of
    the two uploads cancelled it (std 0.05 against 1.7 for fresh noise), while the run's epsilon
    composed them as independent releases. Each noised upload is now keyed by the count of noised
    uploads the client sent before it (its release index, which the server tells it)."""
    server, _, pool = server_for(tmp_path, ["defence.upload=ldp"])
    if engine == "batched":
        server.pool = BatchedPool(server.config, pool.federation)
    clients = [0, 1, 2]
    shared = {key: value.copy() for key, value in server.initial.items()}
    users = {index: server.pool.user(index) for index in clients}
    first = server.train_clients(1, clients, shared)
    for index, user in users.items():  # the same round from the same state: the same clean update
        server.pool.set_user(index, user)
    second = server.train_clients(1, clients, shared)
    assert [server.ldp_uploads[server.client_ids[i]] for i in clients] == [2, 2, 2]
    sigma = gaussian_sigma(2 * server.config.defence.ldp_clip, server.config.defence.ldp_epsilon,
                           server.config.defence.ldp_delta)  # fmt: skip
    for a, b in zip(first, second, strict=True):
        assert a.client_id == b.client_id and np.array_equal(a.item_ids, b.item_ids)
        difference = np.concatenate([(a.rows[k] - b.rows[k]).ravel() for k in a.rows])
        assert abs(difference.std() / (np.sqrt(2) * sigma) - 1) < 0.15  # two independent draws, not one


def test_an_ascent_upload_under_ldp_is_noised_and_counted_like_any_other(tmp_path):
    """Found by an independent check: a leaving client under LDP sent its gradient-ascent upload
    unclipped and un-noised (norms 1.78 and 1.12 against a clip of 1) and the run's epsilon left it out."""
    norms = {}
    for upload in ("none", "ldp"):
        server, _, _ = server_for(tmp_path, [f"defence.upload={upload}"])
        shared = {key: value.copy() for key, value in server.initial.items()}
        update = server.train_clients(1, [4], shared, ascent=True)[0]
        norms[upload] = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in update.rows.values())))
        assert server.ldp_uploads[server.client_ids[4]] == (upload == "ldp")
    sigma = gaussian_sigma(2.0, 8.0, 1e-5)  # the defaults: clip 1, epsilon 8, delta 1e-5
    assert norms["none"] > 0 and norms["ldp"] > 5 * sigma  # noise on every value of the touched rows


def test_an_ldp_upload_that_came_late_or_unreadable_is_counted_and_a_crash_is_not(tmp_path):
    """Found by a review: on Flower a late or undecodable reply (no value) was not counted although
    the client had sent its noised upload, so the run's epsilon left it out and the client's next
    upload took the same release index (the same noise). Only a client that raised sent nothing."""
    from fedunlearn.fl.replies import FAILED, TIMEOUT, Reply

    server, _, _ = server_for(tmp_path, ["defence.upload=ldp"])
    replies = [Reply(0, failure=TIMEOUT), Reply(1, failure="shape"), Reply(2, failure=FAILED), Reply(3, value=object())]
    server._count_ldp_uploads(replies)
    assert [server.ldp_uploads[server.client_ids[i]] for i in range(4)] == [1, 1, 0, 1]
