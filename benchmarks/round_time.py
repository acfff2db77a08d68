"""Seconds per round, seconds to the first round and peak memory: Flower's simulation engine vs the
in-process runner over the same client functions, in one run.

    python benchmarks/round_time.py [--dataset ml-100k] [--clients 100] [--rounds 3] [--full]

Each engine runs in a child process started from a cold interpreter (so imports count towards the
first round); the parent samples the resident memory of the child's whole process tree (Ray's
workers included) and prints one table. --full adds a run with every client in every round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(engine: str, dataset: str, clients_per_round: int, rounds: int, timeout: float) -> dict:
    started = time.time()
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--dataset",
            dataset,
            "--clients",
            str(clients_per_round),
            "--rounds",
            str(rounds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        process = psutil.Process(child.pid)
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(process))
            except psutil.Error:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        stop.set()
        return {"engine": engine, "clients/round": clients_per_round, "note": f"no result within {timeout:.0f} s"}
    stop.set()
    report = json.loads(out.strip().splitlines()[-1])
    ends = report["round_ends"]
    clients_per_round = report["clients"]
    # the last round also evaluates every client: leave it out of the per-round figure
    per_round = [b - a for a, b in zip(ends, ends[1:], strict=False)][:-1] or [ends[0] - report["loop_start"]]
    return {
        "engine": engine,
        "clients/round": clients_per_round,
        "rounds": rounds,
        "s to first round": round(ends[0] - started, 1),
        "s per round": round(sum(per_round) / len(per_round), 2),
        "s per client-update": round(sum(per_round) / len(per_round) / clients_per_round, 4),
        "peak RSS MiB": round(peak / 2**20),
    }


def child(engine: str, dataset: str, clients_per_round: int, rounds: int) -> None:
    from fedunlearn.config import load_config
    from fedunlearn.federation import build_federation

    n_clients = build_federation(load_config(None, [f"data.dataset={dataset}"]).data, 0).n_clients
    fraction = min(1.0, clients_per_round / n_clients)
    config = load_config(
        None,
        [
            f"data.dataset={dataset}",
            f"run.engine={engine}",
            f"train.rounds={rounds}",
            f"train.fraction={fraction}",
            f"eval.every={rounds}",
            "model.dim=64",
        ],
    )
    loop_start = time.time()
    if engine == "flower":
        from server.simulation import run_flower

        result, _ = run_flower(config)
    else:
        from fedunlearn.engine import InProcessPool
        from fedunlearn.progress import Progress
        from fedunlearn.rounds import FederatedServer

        federation = build_federation(config.data, config.run.seed)
        pool = InProcessPool(config, federation)
        result = FederatedServer(config, federation.client_ids, federation.n_items, pool, Progress(rounds, False)).run()
    actual = min(n_clients, clients_per_round)
    print(json.dumps({"round_ends": result.round_ends, "loop_start": loop_start, "clients": actual}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--clients", type=int, default=100, help="clients per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--full", action="store_true", help="also every client in every round")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dataset, args.clients, args.rounds)
        return
    import pandas as pd

    plans = [(engine, args.clients) for engine in ("inprocess", "flower")]
    if args.full:
        plans += [("inprocess", 10**6), ("flower", 10**6)]
    rows = []
    for engine, clients in plans:
        print(
            f"measuring {engine} at {clients if clients < 10**6 else 'all'} clients/round ...",
            file=sys.stderr,
            flush=True,
        )
        rows.append(measure(engine, args.dataset, clients, args.rounds, args.timeout))
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
