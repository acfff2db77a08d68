"""What a server under secure aggregation reads of a removed client by differencing Retrain's replay:
per replayed round, the original round's secure sum less the replay's, against the removed clients'
own contributions to the original round (`defence.upload = "secagg"`, unlearning/retrain.py).

    python benchmarks/secagg_retrain.py [--set KEY=VALUE ...]   (e.g. --set 'unlearn.drop_random="1@4"')
    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/secagg_retrain.py --set data.dataset=ml-100k

Two runs of the same event: Retrain replaying with the run's own training draws (what it did before
2026-12-07, reproduced here by handing the replay the run's own seed) and with its own draws (now).
The figures: relative error ||D - R|| / ||R|| and cosine between the difference D and the removed
clients' summed contribution R, over the rows a removed client touched; an exact read is 0 and 1.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

import fedunlearn.unlearning.retrain as retrain
from fedunlearn.config import load_config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.fl.secure_round import SecureLayout
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server, reproducible_torch
from fedunlearn.runs.runner import schedule_and_history


def run(overrides: list[str], event: int, own_draws: bool, folder: str) -> list[str]:
    config = load_config(None, ["defence.upload=secagg", "run.engine=batched", f"train.rounds={event}",
                                f'unlearn.drop_random="2%@{event}"', "unlearn.method=retrain", *overrides])  # fmt: skip
    federation = build_federation(config.data, config.run.seed)
    config, schedule, history = schedule_and_history(config, federation, Path(folder))
    (event,) = schedule  # the round the event comes before
    removed = set(schedule[event])
    pool = BatchedPool(config, federation)
    sums: dict[tuple[int, int], np.ndarray] = {}  # (pass, round) -> the secure sum the server received
    theirs: dict[int, np.ndarray] = defaultdict(float)  # round -> the removed clients' contributions, original pass
    now = {"pass": 0, "round": 0}
    summed, add = pool.train_summed, SecureLayout.add

    def recording_sum(round_number, *args, **kwargs):
        if round_number <= now["round"]:
            now["pass"] += 1
        now["round"] = round_number
        contributors, failed, total = summed(round_number, *args, **kwargs)
        sums[(now["pass"], round_number)] = total.copy()
        return contributors, failed, total

    def recording_add(self, total, update, kept=None):
        before = total.copy()
        add(self, total, update, kept)
        if now["pass"] == 0 and update.client_id in removed:
            theirs[now["round"]] = theirs[now["round"]] + (total - before)

    pool.train_summed = recording_sum  # type: ignore[method-assign]
    SecureLayout.add = recording_add  # type: ignore[method-assign]
    seeds = retrain.retrain_seed
    if own_draws:
        retrain.retrain_seed = lambda config, round_number: config.run.training_seed()  # type: ignore[assignment]
    try:
        with reproducible_torch(1):
            federated_server(config, federation, pool, Progress(1, False), history, schedule).run()
    finally:
        SecureLayout.add, retrain.retrain_seed = add, seeds
    draws = "run's own (before)" if own_draws else "its own (now)"
    differences = [sums[(0, r)] - sums[(1, r)] for r in range(1, event)]
    theirs_by_round = [theirs[r] for r in range(1, event)]
    lines = [_read(draws, str(r), len(removed), d, t) for r, d, t in zip(range(1, event), differences, theirs_by_round)]
    return [*lines, _read(draws, f"1-{event - 1} summed", len(removed), sum(differences), sum(theirs_by_round))]


def _read(draws: str, rounds: str, removed: int, difference: np.ndarray, own: np.ndarray) -> str:
    """The difference against the removed clients' contribution, over the entries theirs touch."""
    rows = own != 0
    d, r = difference[rows], own[rows]
    error = np.linalg.norm(d - r) / np.linalg.norm(r)
    cosine = float(d @ r / (np.linalg.norm(d) * np.linalg.norm(r)))
    return f"| {draws} | {rounds} | {removed} | {error:.2e} | {cosine:.4f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--event", type=int, default=4, help="the drop event comes before this round (default 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.event < 2:
        parser.error("--event must be 2 or more: Retrain replays the rounds before it")
    print(f"settings: --event {args.event} {' '.join(args.set)}")
    print("| Retrain's draws | replayed round | removed clients | relative error | cosine |\n|:--|--:|--:|--:|--:|")
    for own_draws in (True, False):
        with tempfile.TemporaryDirectory() as folder:
            print("\n".join(run(args.set, args.event, own_draws, folder)), flush=True)


if __name__ == "__main__":
    main()
