"""Progress never looks hung: each call's client count stays within its total, and every drop
event's method (each trial of `unlearn.compare` too) shows as its own phase."""

import pandas as pd

from fedunlearn.cli import main
from fedunlearn.progress import Progress
from fedunlearn.unlearning.registry import METHODS

TINY = ["data.synthetic_users=20", "data.synthetic_items=80", "data.synthetic_interactions=10",
        "data.test_negatives=30", "model.dim=8", "train.rounds=4", "eval.every=1"]  # fmt: skip


def test_counts_stay_within_their_call_and_each_method_shows_as_a_phase(tmp_path, monkeypatch):
    shown = []
    original = Progress._show

    def record(self):
        shown.append((self.work, self.done, self.clients, self.phase))
        original(self)

    monkeypatch.setattr(Progress, "_show", record)
    settings = [*TINY, 'unlearn.drop="3@3"', "unlearn.method=federaser", "unlearn.compare=true"]
    assert main(["run", *(arg for s in settings for arg in ("--set", s)), "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert all(done <= clients for _, done, clients, _ in shown), max(shown, key=lambda s: s[1] - s[2])
    phases = {phase for *_, phase in shown if phase}
    assert phases == {f"drop before round 3: {method}" for method in METHODS}
    assert {"training", "evaluating"} <= {work for work, *_ in shown}


def test_a_replay_names_the_round_it_trains(tmp_path, monkeypatch):
    """The bar sat at the run's round while Retrain replayed its rounds, its client count going
    0..N again and again with nothing to say which round it was on (a new user's walk)."""
    shown = []
    original = Progress._show

    def record(self):
        original(self)
        shown.append(dict(item.split("=", 1) for item in self.bar.postfix.split(", ")))  # as the bar prints it

    monkeypatch.setattr(Progress, "_show", record)
    settings = [*TINY, 'unlearn.drop="3@4"', "unlearn.method=retrain"]
    assert main(["run", *(arg for s in settings for arg in ("--set", s)), "--out", str(tmp_path / "r")]) == 0
    replayed = [key for row in shown if "phase" in row for key in row if key.startswith("training round")]
    assert list(dict.fromkeys(replayed)) == ["training round 1", "training round 2", "training round 3"]
    assert not any(key.startswith("training round") for row in shown if "phase" not in row for key in row)


def test_the_privacy_stages_show_as_phases_of_the_runs_bar(tmp_path, monkeypatch):
    phases = []
    original = Progress._show

    def record(self):
        phases.append(self.phase)
        original(self)

    monkeypatch.setattr(Progress, "_show", record)
    settings = [*TINY, "defence.method=attrcloak-df", "defence.steps=3", "audit.attackers=[mlp]"]
    settings += ["audit.attributes=[gender]"]  # every client holds a gender three or more share: all defend
    assert main(["run", *(arg for s in settings for arg in ("--set", s)), "--quiet", "--out", str(tmp_path / "r")]) == 0
    shown = [phase for phase in dict.fromkeys(phases) if phase]
    assert shown == ["privacy: audit of the trained model", "privacy: attrcloak-df on 20 clients, then its audit"]


def test_a_long_phase_keeps_redrawing_its_elapsed_time(monkeypatch):
    """A Flower run's AttrCloak-DD sat at "phase=privacy: attrcloak-dd ... (0 s)" for eight minutes:
    its secure sums report nothing to the bar, and the elapsed time was drawn only on a report."""
    import time

    import fedunlearn.progress as progress_module

    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.05)
    progress = Progress(1, enabled=True)
    with progress.during("privacy: a long defence"):
        time.sleep(1.2)
        assert progress.bar.postfix.startswith("round=0, phase=privacy: a long defence (1 s)")
    progress.close()
    assert progress.heartbeat is not None and not progress.heartbeat.is_alive()
    quiet = Progress(1, enabled=False)
    with quiet.during("x"):
        pass
    assert quiet.heartbeat is None  # no thread where nothing is drawn


def test_each_defence_counts_its_steps_on_the_bar(tmp_path, monkeypatch):
    """A defence ran for minutes with nothing counting (only its phase's seconds): each now counts
    its steps against its cap, and the count it reaches is the steps the audit table reports."""
    shown = []
    original = Progress._show

    def record(self):
        shown.append((self.phase, self.work, self.done, self.clients))
        original(self)

    monkeypatch.setattr(Progress, "_show", record)
    out = tmp_path / "r"
    settings = [*TINY, "defence.compare=true", "defence.steps=6", "audit.attackers=[mlp]"]
    assert main(["run", *(arg for s in settings for arg in ("--set", s)), "--quiet", "--out", str(out)]) == 0
    reached = {}
    for phase, work, done, most in shown:
        if work == "defence step" and phase:
            assert most == 6 and done <= most
            reached[phase.split()[1]] = done
    steps = pd.read_csv(out / "audit.csv").dropna(subset=["steps"]).groupby("defence")["steps"].first()
    assert reached == {defence: int(count) for defence, count in steps.items()} and len(reached) >= 4
