"""A run killed at any moment continues with `fedunlearn run --resume` to exactly the numbers of a
run that was never interrupted; results folders never look finished before they are."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import TINY

import fedunlearn.runs.results
import fedunlearn.unlearning.federaser as federaser_module
from fedunlearn.cli import main

SETTINGS = TINY + ["data.synthetic_users=30", "train.rounds=8", "eval.every=2"]
DROP = ["unlearn.drop_random=3@5", "unlearn.method=federaser", "unlearn.dt=2"]


def run(out, settings, *extra):
    args = [part for setting in settings for part in ("--set", setting)]
    return main(["run", *args, "--out", str(out), "--quiet", *extra])


def _base(settings):
    """`settings` ("key=value") as the lines of an experiment file's [base] table."""
    return "\n".join(f'"{key}" = {value}' for key, value in dict(s.split("=") for s in settings).items())


def metrics(folder):
    final = json.loads((folder / "final.json").read_text())
    final["metrics"].pop("seconds")
    return final["metrics"], final.get("events", []), final.get("rejected_updates")


def assert_same_run(folder, reference):
    got, want = metrics(folder), metrics(reference)
    assert got[0] == want[0]  # every metric, bit for bit
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in got[1]] == [
        {k: v for k, v in e.items() if k != "seconds"} for e in want[1]
    ]
    assert got[2] == want[2]
    assert not list(folder.parent.glob("*.partial")) and not (folder / "resume.sqlite").exists()


def checkpointed_round(partial):
    try:
        db = sqlite3.connect(f"file:{partial / 'resume.sqlite'}?mode=ro", uri=True)
        row = db.execute("SELECT MAX(round) FROM rounds").fetchone()
        db.close()
    except sqlite3.Error:
        return 0
    return row[0] or 0


ADAPTIVE_SERVER = ["train.server_optimizer=yogi", "train.server_optimizer_lr=0.1"]  # its moments are resumed too
KEPT_CLIENT_STATE = [*DROP, "train.client_optimizer_state=user"]  # the clients' Adam state too


@pytest.mark.parametrize(
    ("engine", "drop"),
    [("batched", DROP), ("inprocess", DROP), ("batched", ADAPTIVE_SERVER), ("inprocess", KEPT_CLIENT_STATE)],
    ids=["batched", "inprocess", "adaptive-server-optimizer", "kept-client-optimizer-state"],
)  # fmt: skip
def test_kill_9_then_resume_gives_the_uninterrupted_numbers(tmp_path, engine, drop):
    settings = [*SETTINGS, "train.rounds=40", "eval.every=5", *drop, f"run.engine={engine}"]
    assert run(tmp_path / "reference", settings) == 0
    out = tmp_path / "killed"
    args = [part for setting in settings for part in ("--set", setting)]
    process = subprocess.Popen([sys.executable, "-m", "fedunlearn.cli", "run", *args, "--out", str(out), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while checkpointed_round(out.with_name("killed.partial")) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "the run never checkpointed round 3"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and [p.parent.name for p in tmp_path.rglob("final.json")] == ["reference"]
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(out, tmp_path / "reference")
    final = json.loads((out / "final.json").read_text())  # the whole run's time: it said the last leg's alone
    assert 0 < final["earlier_legs_seconds"] < final["seconds"]


def test_a_kill_inside_the_unlearning_event_leaves_no_half_event(tmp_path, monkeypatch):
    settings = [*SETTINGS, *DROP]
    assert run(tmp_path / "reference", settings) == 0
    federaser = federaser_module.federaser

    def killed_halfway(server, round_number, forgotten):
        history = server.history
        history.put_checkpoint(3, {k: v * 0 for k, v in history.checkpoint(3).items()})  # a half calibration
        raise KeyboardInterrupt

    monkeypatch.setattr(federaser_module, "federaser", killed_halfway)  # what load_methods finds
    out = tmp_path / "killed"
    assert run(out, settings) == 130
    partial = out.with_name("killed.partial")
    assert checkpointed_round(partial) == 4  # the event before round 5 did not happen, in any part
    history = sqlite3.connect(partial / "history.sqlite")
    leaving = json.loads((tmp_path / "reference" / "final.json").read_text())["events"][0]["clients"]
    stored = {c for (c,) in history.execute("SELECT DISTINCT client_id FROM participation")}
    assert set(leaving) <= stored  # their rows are still there: they have not left yet
    history.close()
    monkeypatch.setattr(federaser_module, "federaser", federaser)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(out, tmp_path / "reference")
    history = sqlite3.connect(out / "history.sqlite")
    assert not set(leaving) & {c for (c,) in history.execute("SELECT DISTINCT client_id FROM sizes")}
    stored_rounds = history.execute("SELECT clients FROM round_updates")
    assert not set(leaving) & {c for (ids,) in stored_rounds for c in json.loads(ids)}


def test_a_kill_while_publishing_is_finished_by_resume(tmp_path, monkeypatch):
    assert run(tmp_path / "reference", SETTINGS) == 0
    publish = fedunlearn.runs.results.publish

    def killed_after_rename(staging):
        staging.folder.rename(staging.out)
        raise KeyboardInterrupt

    monkeypatch.setattr(fedunlearn.runs.results, "publish", killed_after_rename)
    out = tmp_path / "killed"
    assert run(out, SETTINGS) == 130
    assert out.is_dir() and not (out / "final.json").exists()  # renamed, but not finished
    monkeypatch.setattr(fedunlearn.runs.results, "publish", publish)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert_same_run(out, tmp_path / "reference")


def test_sigterm_keeps_a_resumable_folder_without_final_json(tmp_path):
    out = tmp_path / "run"
    args = [part for setting in [*SETTINGS, "train.rounds=400"] for part in ("--set", setting)]
    process = subprocess.Popen([sys.executable, "-m", "fedunlearn.cli", "run", *args, "--out", str(out), "--quiet"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while checkpointed_round(out.with_name("run.partial")) < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().endswith(f"fedunlearn: interrupted; continue with: fedunlearn run --resume {out}")
    assert (out.with_name("run.partial") / "config.toml").is_file() and not list(tmp_path.rglob("final.json"))


def test_resume_refuses_what_is_not_an_interrupted_run(tmp_path, capsys):
    assert run(tmp_path / "done", SETTINGS) == 0
    (tmp_path / "junk").mkdir()
    for folder, message in [("done", "is a finished run"), ("junk", "is not an interrupted fedunlearn run"),
                            ("missing", "is not an interrupted fedunlearn run")]:  # fmt: skip
        capsys.readouterr()
        assert main(["run", "--resume", str(tmp_path / folder), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "done"), "--set", "train.rounds=3"]) == 2


def test_an_interrupted_folder_is_never_deleted_or_overwritten_and_a_live_one_is_locked(tmp_path, capsys):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "my-notes.txt").write_text("keep me")
    (partial / ".lock").write_text("")
    assert run(out, SETTINGS) == 2
    assert "holds an interrupted run: continue it with fedunlearn run --resume" in capsys.readouterr().err
    assert (partial / "my-notes.txt").read_text() == "keep me"
    holder = fedunlearn.runs.results.lock_folder(partial)  # another process writing it now
    try:
        assert run(out, SETTINGS) == 2
        assert "another fedunlearn process is writing" in capsys.readouterr().err
    finally:
        holder.close()


def test_a_bad_input_leaves_no_staging_folder_and_audit_refuses_unfinished_folders(tmp_path, capsys):
    assert run(tmp_path / "bad", [*SETTINGS, "unlearn.drop=nosuch@3"]) == 2
    assert not list(tmp_path.iterdir())
    partial = tmp_path / "x.partial"
    partial.mkdir()
    assert main(["audit", str(partial)]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_an_experiment_keeps_its_finished_runs_and_resumes_the_rest(tmp_path, capsys):
    spec = tmp_path / "e.toml"
    base = _base(SETTINGS)
    spec.write_text(f"[base]\n{base}\n\n[[setting]]\nname = \"a\"\nset = {{}}\n\n"
                    "[[setting]]\nname = \"b\"\nset = { \"train.lr\" = 1e4, \"train.optimizer\" = \"sgd\" }\n\n"
                    "[[setting]]\nname = \"c\"\nset = { \"model.dim\" = 4 }\n")  # fmt: skip
    out = tmp_path / "exp"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 2
    assert "1 of 3 runs failed" in capsys.readouterr().err  # b diverges: recorded, the others kept
    runs = (out / "runs.csv").read_text()
    assert "training diverged" in runs and (out / "a" / "final.json").is_file() and (out / "c" / "final.json").exists()
    table = (out / "table.csv").read_text()
    stamp = (out / "a" / "final.json").stat().st_mtime_ns
    assert main(["experiment", str(spec), "--out", str(out), "--quiet"]) == 2  # exists: --resume it
    capsys.readouterr()
    # b's failure stays in runs.csv (it was dropped, and `report` then read the experiment as whole)
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume", "--only", "a",
                 "--only", "c"]) == 2  # fmt: skip
    assert "1 of 3 runs failed" in capsys.readouterr().err and "training diverged" in (out / "runs.csv").read_text()
    assert (out / "a" / "final.json").stat().st_mtime_ns == stamp  # read back, not rerun
    assert (out / "table.csv").read_text() == table
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume", "--only", "a"]) == 2
    assert (out / "table.csv").read_text() == table  # c's finished run stays in the tables (was a's alone)
    assert "b (seed 0)" in (out / "table.md").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 2


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", ""])
def test_setting_names_must_be_plain_folder_names(tmp_path, capsys, name):
    spec = tmp_path / "e.toml"
    spec.write_text(f'[[setting]]\nname = "{name}"\nset = {{}}\n')
    assert main(["experiment", str(spec), "--out", str(tmp_path / "exp"), "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "exp").exists()
    assert not os.path.exists(tmp_path.parent / "x")


def test_resume_refuses_a_checkpoint_of_other_settings_or_other_data(tmp_path, monkeypatch, capsys):
    """--resume went on from a checkpoint whatever the folder's config.toml or the data file said by
    then: another data.path size ended in an IndexError traceback, fewer train.rounds than the
    checkpoint's in a final.json at a round past the config's (a review)."""
    rng = __import__("numpy").random.default_rng(0)
    lines = [f"{user},{item},5,{user * 100 + t}" for user in range(30)
             for t, item in enumerate(rng.choice(60, 12, replace=False))]  # fmt: skip
    data = tmp_path / "ratings.csv"
    data.write_text("user,item,rating,timestamp\n" + "\n".join(lines) + "\n")
    settings = ["data.dataset=csv", f"data.path={data}", "data.test_negatives=19", "train.rounds=8", "eval.every=2"]
    settings += DROP
    monkeypatch.setattr(federaser_module, "federaser", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "killed"
    assert run(out, settings) == 130
    partial = out.with_name("killed.partial")
    assert checkpointed_round(partial) == 4
    monkeypatch.undo()
    config = (partial / "config.toml").read_text()
    (partial / "config.toml").write_text(config.replace("rounds = 8", "rounds = 10"))
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "other settings (train.rounds: 8 -> 10)" in capsys.readouterr().err
    (partial / "config.toml").write_text(config)
    data.write_text(data.read_text() + "\n".join(f"99,{item},5,{9000 + item}" for item in range(12)) + "\n")
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "the data changed since the checkpoint" in error and "Traceback" not in error
    assert checkpointed_round(partial) == 4 and not out.exists()  # nothing lost, nothing published


def _ratings(path, users):
    rng = __import__("numpy").random.default_rng(0)
    lines = [f"{u},{i},5,{u * 100 + t}" for u in users for t, i in enumerate(rng.choice(60, 12, replace=False))]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def _csv_experiment(tmp_path):
    """A ratings CSV of 30 users and an experiment of two settings, A and B, on it."""
    data = tmp_path / "ratings.csv"
    data.write_text("user,item,rating,timestamp\n")
    _ratings(data, range(30))
    spec = tmp_path / "exp.toml"
    spec.write_text(f'[base]\n"data.dataset" = "csv"\n"data.path" = "{data}"\n"data.test_negatives" = 19\n'
                    '"model.dim" = 8\n"train.rounds" = 2\n[[setting]]\nname = "A"\n[[setting]]\nname = "B"\n'
                    'set = { "train.lr" = 0.02 }\n')  # fmt: skip
    return data, spec


def test_an_experiment_resumed_on_other_data_refuses_its_finished_runs(tmp_path, capsys):
    """A finished run was read back on --resume whatever the data file said by then: the table put a
    run on 30 clients beside one on 60, exit 0 (a review; a checkpoint was already refused)."""
    data, spec = _csv_experiment(tmp_path)
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--only", "A"]) == 0
    _ratings(data, range(100, 130))  # the data file grows between the two calls
    capsys.readouterr()
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "ran on other data" in error and error.count("\n") == 1 and not (out / "B").exists()


def test_resume_only_one_setting_accepts_the_folder_holding_anothers_interrupted_run(tmp_path, monkeypatch, capsys):
    """`--only B` interrupted leaves only B.partial; `--resume --only A` said the folder held no run of
    this experiment (a review). It runs A, and B's interrupted run is said in the table and the exit
    code: the tables had left it out without a word (a user's walk)."""
    import fedunlearn.runs.experiment as experiment_module

    spec = tmp_path / "exp.toml"
    base = _base(TINY)
    spec.write_text(f'[base]\n{base}\n[[setting]]\nname = "A"\n[[setting]]\nname = "B"\n'
                    'set = { "train.lr" = 0.02 }\n')
    out = tmp_path / "out"
    monkeypatch.setattr(experiment_module, "execute", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--only", "B"]) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["B.partial"]
    capsys.readouterr()
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume", "--only", "A"]) == 2
    assert (out / "A" / "final.json").is_file() and (out / "B.partial").is_dir()
    assert "1 of 2 runs failed or are unfinished" in capsys.readouterr().err
    assert "**Unfinished, not in this table**: B" in (out / "table.md").read_text()


def test_resume_checks_a_finished_runs_data_only_where_it_can(tmp_path, monkeypatch, capsys):
    """The data check refused an interrupted run written before runs recorded their data, though its
    checkpoint checks its own data when it resumes, and a finished experiment whose data file had
    moved, though nothing would train on it (a review of the check)."""
    import fedunlearn.runs.experiment as experiment_module

    data, spec = _csv_experiment(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(experiment_module, "execute", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--only", "B"]) == 130
    monkeypatch.undo()
    requested = out / "B.partial" / experiment_module.REQUESTED_FILE
    saved = json.loads(requested.read_text())
    del saved[experiment_module.DATA_KEY]  # as written before runs recorded their data
    requested.write_text(json.dumps(saved))
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume"]) == 0
    data.rename(tmp_path / "moved.csv")  # every run finished: the tables are read back, nothing trains
    capsys.readouterr()
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume"]) == 0


def test_a_resume_that_would_leave_runs_of_its_folder_out_is_refused(tmp_path, capsys):
    """Begun with --seeds 11,12 and resumed without: seeds 0 and 1 ran into the folder and the tables
    held them alone, while seed11 and seed12 stayed beside them for `report` to find."""
    spec = tmp_path / "e.toml"
    base = _base(TINY)
    spec.write_text(f'seeds = [0, 1]\n[base]\n{base}\n[[setting]]\nname = "a"\n')
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--seeds", "11"]) == 0
    capsys.readouterr()
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"{out}/a/seed11 is a run of this folder that this call would not run or read" in error
    assert error.count("\n") == 1 and sorted(p.name for p in (out / "a").iterdir()) == ["seed11"]
    assert main(["experiment", str(spec), "--out", str(out), "--quiet", "--resume", "--seeds", "11"]) == 0


@pytest.mark.slow
def test_ctrl_c_with_several_jobs_starts_no_queued_run(tmp_path):
    """With --jobs 2 every run was handed to the pool at once: on Ctrl-C the runs in flight stopped,
    and the one the pool had already passed on to a worker then trained to the end (a user's walk)."""
    spec = tmp_path / "e.toml"
    base = _base(TINY)
    spec.write_text(f'seeds = [0, 1]\n[base]\n{base}\n"train.rounds" = 2000\n[[setting]]\nname = "a"\n'
                    '[[setting]]\nname = "b"\nset = { "train.lr" = 0.02 }\n')  # fmt: skip
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedunlearn.cli", "experiment", str(spec), "--out", str(out), "--quiet",
               "--jobs", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (checkpointed_round(out / "a" / "seed0.partial") and checkpointed_round(out / "a" / "seed1.partial")):
        assert time.monotonic() < deadline and process.poll() is None, "the first two runs never checkpointed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    assert process.wait(timeout=120) == 130
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*")) == ["a/seed0.partial", "a/seed1.partial"]


def test_a_checkpoint_from_before_the_ldp_rule_loses_the_removed_clients_ids_on_resume(tmp_path, monkeypatch):
    """A review: a checkpoint written before removed clients' LDP counts left with them still held
    them under their ids, and a resume kept and saved them again. On resume they fold into the one
    unnamed figure, which still counts for the run's epsilon."""
    from fedunlearn.fl.rounds import FederatedServer

    settings = [*SETTINGS, *DROP, "defence.upload=ldp"]
    save = FederatedServer._save
    seen: list[dict] = []

    def save_then_stop(server, result, round_number, elapsed):
        save(server, result, round_number, elapsed)
        seen.append(dict(server.ldp_uploads))
        if round_number == 6 and len(seen) == 6:  # round 6 rolls back: the checkpoint is round 5's,
            raise KeyboardInterrupt  # after the event before it

    monkeypatch.setattr(FederatedServer, "_save", save_then_stop)
    out = tmp_path / "run"
    assert run(out, settings) == 130
    partial = out.with_name("run.partial")
    db = sqlite3.connect(partial / "resume.sqlite")
    (meta,) = db.execute("SELECT meta FROM rounds WHERE round = 5").fetchone()
    meta = json.loads(meta)
    leaver = meta["events"][0]["clients"][0]
    meta["ldp_uploads"][leaver] = 99  # as the older rule kept it
    del meta["ldp_uploads_forgotten"]
    db.execute("UPDATE rounds SET meta = ? WHERE round = 5", (json.dumps(meta).encode(),))
    db.commit()
    db.close()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert len(seen) == 9 and all(leaver not in counts for counts in seen[6:])  # rounds 6-8, resumed
    assert json.loads((out / "final.json").read_text())["ldp_uploads_max"] == 99
