"""Seconds per round and peak memory of every engine on ML-100K with all 943 clients per round, then
the batched engine on synthetic federations of growing size at 10% participation, in one run.

    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/engines.py
        [--model mf] [--rounds 6] [--flower-clients 943] [--sizes 1000,10000,100000] [--big-rounds 10]
        [--set KEY=VALUE ...] [--out DIR]

With --out the tables are also written to DIR: engines.csv (ML-100K, per engine), scaling.csv
(the synthetic federations) and, last, benchmark.md (what is printed); `fedunlearn suite` runs it
so and puts the tables and a plot in its report.

Every measurement runs in a child process started from a cold interpreter; the parent samples the
resident memory of the child's whole process tree (Ray's workers included) every 0.2 s. "s per
round" is the mean over rounds 2 to n-1 (so at least 3 rounds): the first also starts the engine
up, the last also evaluates every client; "torch threads" says how many each engine trained with
(the batched engine takes run.num_cpus, the in-process one 1: "batched is x faster" compares the
engines as they run, threads included; --set run.num_cpus=1 compares them at one thread). With --flower-clients below
943, Flower's round is timed on that many sampled clients and scaled to 943 by its cost per client
update (the table says so). The synthetic runs' "whole job s" is the child process's: interpreter
start and imports, data generation, every round and the final evaluation of every client.
"clients/round" is the mean sample of the timed rounds, so "ms per client update" divides the
timed rounds' seconds by the clients they trained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:
    sys.exit("benchmarks/engines.py samples memory with psutil: pip install -e '.[bench]'")

ML100K_CLIENTS = 943


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(child_args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one child; its last stdout line is a JSON report, to which the peak RSS is added."""
    started = time.time()
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(child_args)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
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
        return {"error": f"no result within {timeout:.0f} s"}
    finally:
        stop.set()
    if child.returncode != 0:
        return {"error": f"child exited with {child.returncode}"}
    report = json.loads(out.strip().splitlines()[-1])
    return report | {"wall": time.time() - started, "peak RSS MiB": round(peak / 2**20)}


def child(args: dict[str, Any]) -> None:
    """One job, assembled as `fedunlearn run` assembles it (no results folder is written)."""
    import tempfile

    from fedunlearn.config import load_config
    from fedunlearn.runs.runner import execute

    config = load_config(None, args["overrides"])
    loop_start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        outcome = execute(config, Path(folder), show_progress=False)
    result = outcome.result
    rounds = config.train.rounds  # the batched engine's seconds per round by phase
    phases = {key: value / rounds for key, value in outcome.info.get("engine_seconds", {}).items()}
    report = {"round_ends": result.round_ends, "loop_start": loop_start, "round_clients": result.round_clients,
              "HR@10": result.final["HR@10"], "phases": phases,
              "threads": outcome.info.get("torch_threads", "-")}  # fmt: skip  (Flower: its clients' own)
    print(json.dumps(report))


def per_round(report: dict[str, Any]) -> tuple[float, float]:
    """Mean seconds and mean sampled clients of rounds 2 to n-1 (main refuses fewer than 3 rounds)."""
    ends, clients = report["round_ends"], report["round_clients"][1:-1]
    training = [b - a for a, b in zip(ends, ends[1:], strict=False)][:-1]
    return sum(training) / len(training), sum(clients) / len(clients)


def ml100k_table(
    engines: list[str], model: str, rounds: int, flower_clients: int, timeout: float, extra: list[str]
) -> list[dict[str, Any]]:
    base = ["data.dataset=ml-100k", f"model.name={model}", "model.dim=64", f"train.rounds={rounds}",
            f"eval.every={rounds}", *extra]  # fmt: skip
    rows = []
    for engine in engines:
        clients = flower_clients if engine == "flower" else ML100K_CLIENTS
        fraction = min(1.0, clients / ML100K_CLIENTS)
        print(f"ML-100K: {engine} at {clients} clients per round ...", file=sys.stderr, flush=True)
        report = measure({"overrides": [*base, f"run.engine={engine}", f"train.fraction={fraction}"]}, timeout)
        if "error" in report:
            rows.append({"engine": engine, "note": report["error"]})
            continue
        seconds, clients = per_round(report)
        scaled = seconds * ML100K_CLIENTS / clients
        note = "" if clients == ML100K_CLIENTS else f"timed at {clients:g} clients, scaled"
        if report["phases"]:  # the batched engine: where its training time went, mean over every round
            phases = ", ".join(f"{key} {value:.3f}" for key, value in report["phases"].items())
            note = f"s per round (mean over all {rounds}, the first included) in {phases}"
        rows.append(
            {
                "engine": engine,
                "clients/round": round(clients, 1),
                "torch threads": report["threads"],
                "s per round": round(seconds, 3),
                "s per round, 943 clients": round(scaled, 3),
                "HR@10 after the rounds": round(report["HR@10"], 4) if scaled == seconds else "-",
                "peak RSS MiB": report["peak RSS MiB"],
                "note": note,
            }
        )
    batched = next((row["s per round, 943 clients"] for row in rows if row["engine"] == "batched"), None)
    for row in rows:
        if batched and "s per round, 943 clients" in row:
            row["batched is x faster"] = round(row["s per round, 943 clients"] / batched, 1)
    return rows


def scaling_table(model: str, sizes: list[int], rounds: int, timeout: float, extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        print(f"synthetic: batched, {size} clients at 10% ...", file=sys.stderr, flush=True)
        overrides = [f"data.synthetic_users={size}", "data.synthetic_items=1000", f"model.name={model}",
                     "model.dim=64", f"train.rounds={rounds}", f"eval.every={rounds}", "train.fraction=0.1",
                     "run.engine=batched", *extra]  # fmt: skip
        report = measure({"overrides": overrides}, timeout)
        if "error" in report:
            rows.append({"clients": size, "note": report["error"]})
            continue
        seconds, clients = per_round(report)
        rows.append(
            {
                "clients": size,
                "clients/round": round(clients, 1),
                "rounds": rounds,
                "torch threads": report["threads"],
                "s per round": round(seconds, 3),
                "ms per client update": round(1000 * seconds / clients, 3),
                "whole job s": round(report["wall"], 1),
                "peak RSS MiB": report["peak RSS MiB"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mf", choices=["mf", "ncf"])
    parser.add_argument("--engines", default="batched,inprocess,flower", help="engines timed on ML-100K ('' for none)")
    parser.add_argument("--rounds", type=int, default=6, help="ML-100K rounds per engine (first and last not timed)")
    parser.add_argument("--flower-clients", type=int, default=ML100K_CLIENTS, help="Flower's clients per round")
    parser.add_argument("--sizes", default="1000,10000,100000", help="synthetic federation sizes")
    parser.add_argument("--big-rounds", type=int, default=10, help="rounds of each synthetic federation")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. model.loss=bce (repeatable)")  # fmt: skip
    parser.add_argument("--out", help="also write engines.csv, scaling.csv and benchmark.md into this folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    import pandas as pd

    from fedunlearn.config import load_config
    from fedunlearn.errors import FedUnlearnError

    if min(args.rounds, args.big_rounds) < 3:
        parser.error("--rounds and --big-rounds must be at least 3: rounds 2 to n-1 are the ones timed")
    try:
        load_config(None, args.set)  # refuse a bad override now, not in every child
    except FedUnlearnError as error:
        parser.error(str(error))
    engines = [engine for engine in args.engines.split(",") if engine]
    first = ml100k_table(engines, args.model, args.rounds, args.flower_clients, args.timeout, args.set)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    second = scaling_table(args.model, sizes, args.big_rounds, args.timeout, args.set)
    settings = "".join(f", {override}" for override in args.set)
    text = (
        f"ML-100K, {args.model.upper()} 64-dim, one local epoch{settings}, {args.rounds} rounds per engine:\n"
        f"{pd.DataFrame(first).fillna('').to_markdown(index=False)}\n\n"
        f"Batched engine, synthetic federations (1000 items, ~40 interactions per user), {args.model.upper()}:\n"
        f"{pd.DataFrame(second).to_markdown(index=False)}\n"
    )
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("engines", first), ("scaling", second)):
            if rows:  # a table with no rows (--engines '' or --sizes '') is left out
                pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
        (out / "benchmark.md").write_text(text)  # last: a folder with it is complete


if __name__ == "__main__":
    main()
