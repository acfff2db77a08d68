"""Does the same run give the same model? Runs one federated job several times, each in a fresh
process, and prints a hash of the trained shared parameters per run.

    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/reproducibility.py [--runs 5] [--rounds 15]
        [--set KEY=VALUE ...]

Default job: ML-100K, MF 64-dim, batched engine, run.num_cpus = 2 (the threads are where the
order of float sums can change). `--nondeterministic` runs without torch's deterministic mode,
only the thread count set, to show what the mode guards against.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time

JOB = ["data.dataset=ml-100k", "model.dim=64", "run.engine=batched", "run.num_cpus=2"]


def child(rounds: int, settings: list[str], deterministic: bool) -> None:
    import numpy as np
    import torch

    from fedunlearn.config import load_config
    from fedunlearn.engines.choice import make_pool
    from fedunlearn.fl.federation import build_federation
    from fedunlearn.progress import Progress
    from fedunlearn.runs.assembly import federated_server, reproducible_torch

    config = load_config(None, [*JOB, f"train.rounds={rounds}", f"eval.every={rounds}", *settings])
    federation = build_federation(config.data, config.run.seed)
    pool = make_pool(config, federation)
    with reproducible_torch(pool.threads):  # as a run sets them: the in-process engine trains at one
        if not deterministic:
            torch.use_deterministic_algorithms(False)
        result = federated_server(config, federation, pool, Progress(rounds, False)).run()
    digest = hashlib.sha256()
    for key in sorted(result.shared):
        digest.update(np.ascontiguousarray(result.shared[key]).tobytes())
    print(f"{digest.hexdigest()[:16]} HR@10 {result.final['HR@10']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nondeterministic", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rounds, args.set, not args.nondeterministic)
        return
    command = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
    command += [part for setting in args.set for part in ("--set", setting)]
    command += ["--nondeterministic"] if args.nondeterministic else []
    hashes = []
    for run in range(args.runs):
        started = time.perf_counter()
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        hashes.append(line.split()[0])
        print(f"run {run + 1}: {line}  ({time.perf_counter() - started:.1f} s)")
    print(f"{len(set(hashes))} distinct model(s) in {args.runs} runs")


if __name__ == "__main__":
    main()
