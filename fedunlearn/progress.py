"""Progress on long work: rounds, the clients done in the current call (training, evaluating, a
method's calibration round), the phase under way (a drop event's method) with its elapsed time, and
the latest HR@10."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

HEARTBEAT_SECONDS = 1.0  # a phase's elapsed time is redrawn this often, whatever its own work reports


class Progress:
    def __init__(self, total_rounds: int, enabled: bool = True, label: str = "rounds") -> None:
        self.bar = tqdm(total=total_rounds, desc=label, unit="round", disable=not enabled, dynamic_ncols=True)
        self.round = 0
        self.clients = 0
        self.done = 0
        self.work = "training"  # what the clients of the current call do
        self.call_round: int | None = None  # the round a call inside a phase trains (a replay's, a calibration's)
        self.phase: str | None = None  # e.g. a drop event's method, while it runs
        self.phase_started = 0.0
        self.hr10: float | None = None
        self.stopped = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def start_round(self, round_number: int) -> None:
        self.round = round_number  # the round's training call (start_call) shows it

    def start_call(self, clients: int, work: str, round_number: int | None = None) -> None:
        """A new call to `clients` clients: the count restarts, so it never runs past its total. Inside
        a phase (a drop event's method) the call names the round it trains: the run's own round
        stands still while a Retrain replays its rounds one by one."""
        self.clients, self.done, self.work, self.call_round = clients, 0, work, round_number
        self._show()

    def start_steps(self, most: int) -> Callable[[], None]:
        """A loop of at most `most` steps (a defence; AttrCloak stopping at its null level ends
        sooner) counts its steps on the bar: returns what each step calls."""
        self.start_call(most, "defence step")
        return self.client_done

    def client_done(self, count: int = 1) -> None:
        self.done += count
        if self.done == self.clients or self.done % max(1, self.clients // 10) == 0:
            self._show()

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Label the work done inside the block (shown with its elapsed seconds)."""
        outer, outer_started = self.phase, self.phase_started
        self.phase, self.phase_started = phase, time.perf_counter()
        self._show()
        self._start_heartbeat()
        try:
            yield
        finally:
            self.phase, self.phase_started = outer, outer_started
            self._show()

    def evaluated(self, row: dict[str, float]) -> None:
        self.hr10 = row.get("HR@10")
        self._show()

    def end_round(self, rounds: int = 1) -> None:
        self.bar.update(rounds)

    def close(self) -> None:
        self.stopped.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
        self.bar.close()

    def _start_heartbeat(self) -> None:
        """A phase may run minutes without a client call to show (a defence's secure sums on Flower,
        one every few seconds): its elapsed seconds are redrawn anyway, so the bar never stands
        still. One daemon thread per bar, from its first phase to `close`."""
        if self.bar.disable or self.heartbeat is not None:
            return

        def beat() -> None:
            while not self.stopped.wait(HEARTBEAT_SECONDS):
                if self.phase is not None:
                    self._show()

        self.heartbeat = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        self.heartbeat.start()

    def _show(self) -> None:
        postfix = {"round": self.round}
        if self.phase is not None:
            postfix["phase"] = f"{self.phase} ({time.perf_counter() - self.phase_started:.0f} s)"
        replaying = self.phase is not None and self.call_round is not None
        postfix[f"{self.work} round {self.call_round}" if replaying else self.work] = f"{self.done}/{self.clients}"
        if self.hr10 is not None:
            postfix["HR@10"] = f"{self.hr10:.4f}"
        self.bar.set_postfix(postfix, refresh=True)
