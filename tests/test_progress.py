"""Progress never looks hung: each call's client count stays within its total, and every drop
event's method (each trial of `unlearn.compare` too) shows as its own phase."""

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


def test_the_privacy_stages_show_as_phases_of_the_runs_bar(tmp_path, monkeypatch):
    phases = []
    original = Progress._show

    def record(self):
        phases.append(self.phase)
        original(self)

    monkeypatch.setattr(Progress, "_show", record)
    settings = [*TINY, "defence.method=attrcloak-df", "defence.steps=3", "audit.attackers=[mlp]"]
    assert main(["run", *(arg for s in settings for arg in ("--set", s)), "--quiet", "--out", str(tmp_path / "r")]) == 0
    shown = [phase for phase in dict.fromkeys(phases) if phase]
    assert shown == ["privacy: audit of the trained model", "privacy: attrcloak-df on 20 clients, then its audit"]
