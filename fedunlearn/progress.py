"""Progress on long work: rounds, clients done in the round, the latest HR@10."""

from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, total_rounds: int, enabled: bool = True, label: str = "rounds") -> None:
        self.bar = tqdm(total=total_rounds, desc=label, unit="round", disable=not enabled, dynamic_ncols=True)
        self.round = 0
        self.clients = 0
        self.done = 0
        self.hr10: float | None = None

    def start_round(self, round_number: int, clients: int) -> None:
        self.round, self.clients, self.done = round_number, clients, 0
        self._show()

    def client_done(self, count: int = 1) -> None:
        self.done += count
        if self.done == self.clients or self.done % max(1, self.clients // 10) == 0:
            self._show()

    def evaluated(self, row: dict[str, float]) -> None:
        self.hr10 = row.get("HR@10")
        self._show()

    def end_round(self, rounds: int = 1) -> None:
        self.bar.update(rounds)

    def close(self) -> None:
        self.bar.close()

    def _show(self) -> None:
        postfix = {"round": self.round, "clients": f"{self.done}/{self.clients}"}
        if self.hr10 is not None:
            postfix["HR@10"] = f"{self.hr10:.4f}"
        self.bar.set_postfix(postfix, refresh=True)
