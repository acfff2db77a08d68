"""What one drop event costs each unlearning method, side by side with Retrain: wall time of the
event, client-epochs, optimizer steps, and the speedups in each, in one run.

    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/unlearning.py
        [--methods retrain,federaser,fru] [--model mf] [--seed 0] [--repeats 1] [--set KEY=VALUE ...]

Each method runs as its own `fedunlearn run` (a cold process, batched engine) of issue 12's protocol:
ML-100K, 64-dim, 20 rounds, a seeded 5% of the clients leave before round 10, attackers boosted 30x.
The event's seconds are the server's own measurement of the method (final.json), not the process's.
With --repeats above 1 each method runs that many times, interleaved, and the table gives the
median wall time. Run it on a quiet machine: a second job on the same cores inflates every time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedunlearn.fl.comparison import MEASURABLE_SECONDS

PROTOCOL = [
    "data.dataset=ml-100k", "model.dim=64", "train.rounds=20", "eval.every=5", 'unlearn.drop_random="5%@10"',
    "unlearn.poison=true", "unlearn.poison_boost=30.0", "run.engine=batched",
]  # fmt: skip


def run_event(method: str, model: str, seed: int, extra: list[str], out: Path) -> dict:
    settings = [*PROTOCOL, f"model.name={model}", f"run.seed={seed}", f"unlearn.method={method}", *extra]
    command = [sys.executable, "-m", "fedunlearn.cli", "run", "--quiet", "--out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    event = json.loads((out / "final.json").read_text())["events"][0]
    return event | {"history_file": event["history_bytes"]["file"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="retrain,federaser,fru")
    parser.add_argument("--model", default="mf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "retrain":
        parser.error("--methods must start with retrain (the reference of every speedup)")
    events: dict[str, list[dict]] = {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for method in methods:
                out = Path(scratch) / f"{method}-{repeat}"
                events[method].append(run_event(method, args.model, args.seed, args.set, out))
                print(f"{method} run {repeat + 1}: {events[method][-1]['seconds']:.2f} s", file=sys.stderr)
    seconds = {method: statistics.median(e["seconds"] for e in runs) for method, runs in events.items()}
    reference = events["retrain"][0]
    print("| method | event wall time | client-epochs | optimizer steps | speedup (wall) | speedup (client-epochs) "
          "| speedup (steps) | history at the event | retained HR@10 |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for method, runs in events.items():
        event = runs[0]
        epochs, steps = event["client_epochs"], event["optimizer_steps"]
        ratio = lambda ref, value, floor=0.0: f"{ref / value:.2f}" if min(ref, value) > floor else "-"  # noqa: E731
        wall = ratio(seconds["retrain"], seconds[method], MEASURABLE_SECONDS)  # no ratio over bookkeeping
        print(
            f"| {method} | {seconds[method]:.2f} s | {epochs:.0f} | {steps} | {wall} "
            f"| {ratio(reference['client_epochs'], epochs)} | {ratio(reference['optimizer_steps'], steps)} "
            f"| {event['history_file'] / 1e6:.1f} MB | {event['after']['HR@10']:.4f} |"
        )


if __name__ == "__main__":
    main()
