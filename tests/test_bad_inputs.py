"""Every bad input ends in one line `fedunlearn: error: ...`, exit 2, no traceback, and nothing on
disk that looks finished (docs/ROBUSTNESS.md lists them)."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import TINY

from fedunlearn.cli import main
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.history import HistoryStore

SMALL = [part for setting in TINY + ["train.rounds=2"] for part in ("--set", setting)]
TOO_LONG = "x" * 300


def run(tmp_path, *args, out="out"):
    return main(["run", *SMALL, "--quiet", "--out", str(tmp_path / out), *args])


@pytest.fixture
def files(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b"\xff\xfe[train]\nrounds = 2\n")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "a-file").write_text("")
    ratings = [f"{user},{(7 * user + 3 * k) % 120},4,{k}" for user in range(30) for k in range(15)]
    (tmp_path / "ratings.csv").write_text("user,item,rating,timestamp\n" + "\n".join(ratings) + "\n")
    experiments = {
        "setting-string": 'setting = "x"\n',
        "set-number": '[[setting]]\nname = "a"\nset = 3\n',
        "base-number": 'base = 5\n[[setting]]\nname = "a"\n',
        "seeds-bool": 'seeds = [true]\n[[setting]]\nname = "a"\n',
        "name-number": "[[setting]]\nname = 7\n",
        "name-list": '[[setting]]\nname = ["a"]\n',  # TypeError: unhashable type (a review)
        "name-escapes": '[[setting]]\nname = "../x"\n',
        "seeds-twice": 'seeds = [0, 0]\n[[setting]]\nname = "a"\n',
        "models-twice": 'models = ["mf", "mf"]\n[[setting]]\nname = "a"\n',
        "misspelt-set": '[[setting]]\nname = "a"\nsett = { "train.rounds" = 2 }\n',
    }
    for name, text in experiments.items():
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


CASES = {
    "lr nan": (["--set", "train.lr=nan"], "train.lr must be a finite number"),
    "init_std inf": (["--set", "model.init_std=inf"], "model.init_std must be a finite number"),
    "diverging sgd": (["--set", "train.optimizer=sgd", "--set", "train.lr=1e6"], "training diverged at round"),
    "non-utf8 toml": (["{tmp}/latin1.toml"], "is not a UTF-8 text file"),
    "binary toml": (["{tmp}/binary.toml"], "is not a UTF-8 text file"),
    "out under a file": (["--out", "{tmp}/a-file/run"], "cannot write or read"),
    "out name too long": (["--out", "{tmp}/" + TOO_LONG], "File name too long"),
    "out where nothing can be made": (["--out", "/proc/fedunlearn-run"], "cannot write or read"),
    "absurd model.dim": (["--set", "model.dim=1000000000"], "model.dim = 1000000000 needs"),
    "target item past the catalogue": (
        ["--set", "unlearn.poison=true", "--drop", "1@2", "--set", "unlearn.target_item=100000"],
        "unlearn.target_item = 100000 but the catalogue",
    ),
    "0% dropped": (["--drop-random", "0%@2"], "drops nobody"),
    "an attacker trained on every user": (  # refused after the training (a review)
        ["--set", "audit.enabled=true", "--set", "audit.shadow_share=1"], "audit.shadow_share must be in (0, 1)"
    ),
    "an audit of a CSV without attributes": (  # said before the training, not after it
        ["--set", "data.dataset=csv", "--set", "data.path={tmp}/ratings.csv", "--set", "defence.upload=ldp"],
        "the dataset has none (a CSV without data.users_path)",
    ),
    "fractional count": (["--drop-random", "2.5@2"], "a count of clients is a whole number"),
    "drop in central mode": (["--set", "run.mode=central", "--drop", "1@2"], "a drop schedule needs run.mode"),
    "compare without a drop": (["--set", "unlearn.compare=true"], "act at a drop event"),
    "method without a drop": (["--method", "federaser"], "act at a drop event"),
    "excluded client dropped": (["--set", 'data.exclude_clients=["1"]', "--drop", "1@2"], "never took part"),
    "everyone excluded": (["--set", f"data.exclude_clients={[str(i) for i in range(10)]}".replace("'", '"')],
                          "excludes every client"),  # fmt: skip
    "unknown fault": (["--set", "faults.kinds=[melt]"], "faults.kinds must name"),
    "flower at-risk defence without the audit": (
        ["--engine", "flower", "--set", "defence.method=attrcloak-df", "--set", "defence.clients=at-risk"],
        "defence.clients = 'at-risk' needs the audit's central view on the Flower engine",
    ),
    "flower defence comparison without the audit": (
        ["--engine", "flower", "--set", "defence.compare=true"], "defence.compare needs the audit's central view",
    ),
    "timeout fault in process": (["--set", "faults.kinds=[timeout]"], "needs run.engine=flower"),
    "every reply faulty": (["--set", "faults.share=1", "--set", "faults.kinds=[shape]"], "0 valid replies of 10"),
    "resume with settings": (["--resume", "{tmp}/out", "--set", "train.rounds=3"], "--resume continues a run"),
    "attackers without poison": (["--set", "unlearn.attackers=[1]"], "unlearn.attackers is filled in"),
    "a defence in central mode": (["--set", "run.mode=central", "--set", "defence.method=attrcloak-dd"],
                                  "defence.method act on a federation: run.mode = 'central' would ignore"),  # fmt: skip
    "the audit in popularity mode": (["--set", "run.mode=popularity", "--set", "audit.enabled=true"],
                                     "audit.enabled act on a federation"),  # fmt: skip
    "diverging central training": (["--set", "run.mode=central", "--set", "central.lr=1e30"],
                                   "central training diverged in epoch"),  # fmt: skip
    "out naming no folder": (["--out", "/"], "names no folder"),
    "a leaving client listed to defend": (
        ["--drop", "1@2", "--set", "defence.method=attrcloak-df", "--set", "defence.clients=listed",
         "--set", "defence.client_ids=[1]"], "defence.client_ids names clients ['1'] who leave",
    ),  # fmt: skip
    "a cut-off listed twice": (["--set", "eval.ks=[10,10]"], "eval.ks must be distinct"),
}


def _expand(args, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)) for a in args]


def assert_one_line(capsys, message):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedunlearn: error: "), err
    assert message in err and "Traceback" not in err


def assert_nothing_finished(tmp_path):
    assert not list(tmp_path.rglob("final.json")) and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("case", CASES)
def test_run_refuses_bad_input_in_one_line(files, capsys, case):
    args, message = CASES[case]
    args = _expand(args, files)
    if args[0].endswith(".toml"):  # a config file: no tiny settings on top
        code = main(["run", args[0], "--quiet", "--out", str(files / "out")])
    elif "--resume" in args:
        code = main(["run", *args, "--quiet"])
    elif "--out" in args:
        code = main(["run", *SMALL, "--quiet", *args])
    else:
        code = run(files, *args)
    assert code == 2
    assert_one_line(capsys, message)
    assert_nothing_finished(files)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("setting-string", "setting must be [[setting]] tables"),
        ("set-number", "the set of setting 'a' must be a table"),
        ("base-number", "[base] must be a table"),
        ("seeds-bool", "seeds must be a list of int values"),
        ("name-number", "setting name 7 is used as a folder name"),
        ("name-list", "setting name ['a'] is used as a folder name"),
        ("name-escapes", "setting name '../x' is used as a folder name"),
        ("seeds-twice", "seeds lists 0 more than once"),  # it ran once and counted as two seeds
        ("models-twice", "models lists mf more than once"),
        ("misspelt-set", "setting 'a' has ['sett']"),  # it ran the defaults
    ],
)
def test_experiment_files_of_the_wrong_shape_are_refused(files, capsys, name, message):
    assert main(["experiment", str(files / f"{name}.toml"), "--out", str(files / "exp"), "--quiet"]) == 2
    assert_one_line(capsys, message)
    assert not (files / "exp").exists() and not (files.parent / "x").exists()


def test_a_full_disk_in_the_history_keeps_a_resumable_folder(tmp_path, capsys, monkeypatch):
    opened = HistoryStore.__init__

    def tiny_disk(self, path, policy):
        opened(self, path, policy)
        self.db.execute("PRAGMA max_page_count = 20")  # a few rounds' worth, then "database or disk is full"

    monkeypatch.setattr(HistoryStore, "__init__", tiny_disk)
    code = main(["run", *SMALL, "--set", "train.rounds=12", "--drop", "1@11", "--method", "fru", "--quiet",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert_one_line(capsys, f"database or disk is full; free space, then fedunlearn run --resume {tmp_path / 'out'}")
    assert (tmp_path / "out.partial" / "config.toml").is_file() and not list(tmp_path.rglob("final.json"))
    monkeypatch.setattr(HistoryStore, "__init__", opened)
    assert main(["run", "--resume", str(tmp_path / "out"), "--quiet"]) == 0


@pytest.fixture
def audited(tmp_path):
    out = tmp_path / "audited"
    assert run(tmp_path, "--set", "audit.enabled=true", "--set", "audit.attackers=[mlp]", out="audited") == 0
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path):
    path.write_bytes(b"PK\x03\x04 this is no archive")


def _nan(path):
    arrays = dict(np.load(path))
    arrays["before"][0, 0] = np.nan
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: _truncate(run / "central_view_embeddings.npz"), "is damaged"),
        (lambda run: _garbage(run / "central_view_embeddings.npz"), "is damaged"),
        (lambda run: _nan(run / "central_view_embeddings.npz"), "holds non-finite embeddings"),
        (lambda run: (run / "config.toml").write_bytes(bytes(range(256))), "is not a UTF-8 text file"),
        (lambda run: (run / "final.json").unlink(), "is not a finished run"),
    ],
)
def test_audit_of_a_damaged_folder_is_one_line(audited, capsys, damage, message):
    damage(audited)
    capsys.readouterr()
    assert main(["audit", str(audited)]) == 2
    assert_one_line(capsys, message)


def test_audit_to_an_impossible_out_is_one_line_and_local_false_works(audited, capsys):
    capsys.readouterr()
    assert main(["audit", str(audited), "--out", str(audited.parent / "no-such-folder" / "x.csv")]) == 2
    printed = capsys.readouterr()  # said before the audit, not after its table (a review)
    assert printed.out == "" and printed.err.count("\n") == 1 and "no-such-folder does not exist" in printed.err
    for inside in (audited / "audit.csv", audited / "final.json", audited.parent / "taken.csv"):
        inside.touch()
        before = inside.read_bytes()
        assert main(["audit", str(audited), "--out", str(inside)]) == 2  # the run's own files were overwritten
        assert_one_line(capsys, "exists or lies inside the run folder")
        assert inside.read_bytes() == before
    assert main(["audit", str(audited), "--set", "audit.local=false"]) == 0
    out = audited.parent / "no-local"
    assert run(audited.parent, "--set", "audit.enabled=true", "--set", "audit.local=false", out="no-local") == 0
    assert set(pd.read_csv(out / "audit.csv")["audit"]) == {"global"}


@pytest.mark.parametrize("name", ["mf", "ncf"])
def test_the_memory_check_counts_the_parameters_exactly_without_building_them(name):
    import numpy as np

    from fedunlearn.config import load_config
    from fedunlearn.models import build_model
    from fedunlearn.runs.runner import parameter_floats

    for dim in (3, 32):
        config = load_config(None, [f"model.name={name}", f"model.dim={dim}"])
        model = build_model(config.model, 50)
        shared, user = model.init_shared(np.random.default_rng(0)), model.init_user(np.random.default_rng(0))
        built = sum(v.size for v in shared.values()) + 7 * sum(v.size for v in user.values())
        assert parameter_floats(config.model, 50, 7) == built


def test_audit_with_another_seed_attacks_the_saved_attributes_and_refuses_other_data(audited, capsys, tmp_path):
    """`--set run.seed=1` (the help's own example) rebuilt the synthetic data with seed 1, whose
    users hold other attribute values than the embeddings saved: the attack read chance."""
    import tomllib

    capsys.readouterr()
    assert main(["audit", str(audited), "--set", "data.synthetic_users=8"]) == 2
    assert_one_line(capsys, "data.synthetic_users: the audit attacks the data the run saved")
    assert main(["audit", str(audited), "--set", "run.seed=1", "--out", str(tmp_path / "seed1.csv")]) == 0
    from fedunlearn.config import load_config
    from fedunlearn.privacy.audit import privacy_table

    saved = np.load(audited / "central_view_embeddings.npz")
    names = [key for key in saved.files if key.startswith("attribute_")]
    attributes = pd.DataFrame({key[len("attribute_") :]: saved[key] for key in names})
    config = load_config(audited / "config.toml", ["run.seed=1"])
    expected, _ = privacy_table({"embedding": saved["before"]}, attributes, config)
    table = pd.read_csv(tmp_path / "seed1.csv")
    np.testing.assert_allclose(table["balanced_accuracy"], expected["balanced_accuracy"], rtol=1e-12)
    assert tomllib.loads((audited / "config.toml").read_text())["run"]["seed"] == 0


EXPERIMENT = ('[base]\n"data.synthetic_users" = 12\n"data.synthetic_items" = 60\n"data.synthetic_interactions" = 8\n'
              '"data.test_negatives" = 20\n"model.dim" = 4\n"train.rounds" = 2\n'
              '[[setting]]\nname = "a"\n[[setting]]\nname = "b"\nset = { "train.lr" = 0.02 }\n')  # fmt: skip


def test_an_experiment_resumed_with_other_settings_is_refused(tmp_path, capsys):
    """--resume read the finished runs back beside runs of the new settings, and went on from an
    interrupted run's checkpoint trained with the old ones, both with exit 0."""
    (tmp_path / "e.toml").write_text(EXPERIMENT)
    out = tmp_path / "exp"
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(out), "--quiet"]) == 0
    assert set(pd.read_csv(out / "runs.csv")["engine"]) == {"batched"}  # the engine that ran, not "auto"
    capsys.readouterr()
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(out), "--quiet", "--resume",
                 "--set", "model.dim=8"]) == 2  # fmt: skip
    assert_one_line(capsys, "ran with other settings (model.dim: 4 -> 8)")
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(out), "--quiet", "--resume"]) == 0
    # a run finished by an older version: its rows (Retrain keys without the engine, history bytes of
    # the arrays alone) would sit beside this version's and lose their Retrain
    rows = next(out.rglob("experiment_rows.json"))
    rows.write_text(json.dumps(json.loads(rows.read_text())["rows"]))
    capsys.readouterr()
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(out), "--quiet", "--resume"]) == 2
    assert_one_line(capsys, "was finished by an older fedunlearn, whose table rows are not comparable")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(foreign), "--quiet", "--resume"]) == 2
    assert_one_line(capsys, "holds no run of this experiment to resume")
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_an_experiment_with_a_failed_run_says_so_in_its_table_and_the_report_refuses_it(tmp_path, capsys):
    (tmp_path / "e.toml").write_text(EXPERIMENT.replace('"train.lr" = 0.02', '"train.lr" = 1e30'))
    out = tmp_path / "exp"
    assert main(["experiment", str(tmp_path / "e.toml"), "--out", str(out), "--quiet"]) == 2
    assert "**Failed, not in this table**: b (seed 0): training diverged" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 2
    assert_one_line(capsys, "1 of its runs failed (b (seed 0))")


def test_a_report_never_deletes_a_partial_folder_and_refuses_a_non_finite_metric(tmp_path, capsys):
    assert run(tmp_path, out="done") == 0
    partial = tmp_path / "report.partial"
    partial.mkdir()
    (partial / "resume.sqlite").write_text("an interrupted run's")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "done"), "--out", str(tmp_path / "report")]) == 2
    assert_one_line(capsys, "report.partial exists")
    assert (partial / "resume.sqlite").read_text() == "an interrupted run's"
    final = tmp_path / "done" / "final.json"
    final.write_text(final.read_text().replace('"HR@10": ', '"HR@10": NaN, "was": '))
    assert main(["report", str(tmp_path / "done"), "--out", str(tmp_path / "r2")]) == 2
    assert_one_line(capsys, "holds no finite metrics")


def test_a_resume_that_fails_on_bad_input_keeps_the_interrupted_run(tmp_path, capsys, monkeypatch):
    """A moved data file (or any bad input) at --resume deleted the rounds already run."""
    import fedunlearn.runs.results as results

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedunlearn.runs.runner.execute", interrupted)
    assert run(tmp_path) == 130
    partial = tmp_path / "out.partial"
    assert (partial / "config.toml").is_file()
    monkeypatch.undo()

    def moved(*args, **kwargs):
        raise results.FedUnlearnError("interactions file data/moved.csv not found")

    monkeypatch.setattr("fedunlearn.runs.runner.execute", moved)
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("fedunlearn: error: interactions file data/moved.csv not found (the "
                                           "interrupted run stays in")  # fmt: skip
    assert "Traceback" not in err
    assert (partial / "config.toml").is_file()


def test_listed_defence_clients_are_not_checked_when_no_defence_runs(tmp_path):
    assert run(tmp_path, "--drop", "1@2", "--set", "defence.clients=listed", "--set", "defence.client_ids=[1]") == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["unlearn.drop='3@2'"], "write strings with double quotes"),  # the run-config quotes them in '...'
        (["audit.enabled=true"], "a deployment runs no audit"),
        (["defence.compare=true"], "needs the audit's central view on the Flower engine"),  # checked as on Flower
        (["train.client_optimizer_state=user"], "train.client_optimizer_state"),
        (['unlearn.drop="3@9"', "unlearn.method=retrain"], "drop event '3@9' is at round 9"),
    ],
)
def test_deploy_refuses_what_the_deployed_server_would_refuse_before_anything_starts(tmp_path, settings, message):
    """These passed the deploy's check and failed in the ServerApp after the SuperLink and every
    SuperNode had started (a review)."""
    from server.deploy import deploy

    with pytest.raises(FedUnlearnError, match=message):
        deploy([*TINY, "train.rounds=3", *settings], 10, tmp_path / "out", tmp_path / "work")
    assert list(tmp_path.iterdir()) == []


def test_a_drop_schedule_of_several_events_reaches_the_deployed_server_whole():
    from server.app import split_overrides

    text = ";".join(['unlearn.drop="3@8;7,9@12"', " train.rounds=14", "model.name=ncf"])
    assert split_overrides(text) == ['unlearn.drop="3@8;7,9@12"', "train.rounds=14", "model.name=ncf"]
