"""What `defence.secagg_min_clients` costs: per setting, the rows a round's secure sum leaves out
(touched by fewer clients than the minimum) and the final HR@10 / NDCG@10, for a minimum of 1 (every
row summed) and of 2 (the default), one run each on the batched engine.

    python benchmarks/secagg_rows.py [--set KEY=VALUE ...]
    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/secagg_rows.py --set data.dataset=ml-100k \\
        --set train.fraction=0.02 --set train.rounds=60 --set eval.every=60
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedunlearn.config import load_config
from fedunlearn.engines.batched import BatchedPool
from fedunlearn.fl.federation import build_federation
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server, reproducible_torch


def run(overrides: list[str], least: int) -> str:
    config = load_config(None, [*overrides, "defence.upload=secagg", f"defence.secagg_min_clients={least}",
                                "run.engine=batched"])  # fmt: skip
    federation = build_federation(config.data, config.run.seed)
    pool = BatchedPool(config, federation)
    left_out, touched, clients = [], [], []
    train = pool.train

    def counting(*args, **kwargs):
        replies = train(*args, **kwargs)
        counts = np.zeros(federation.n_items, dtype=int)
        for reply in replies:
            if reply.value is not None:
                counts[reply.value.item_ids] += 1
        left_out.append(int(((counts > 0) & (counts < least)).sum()))
        touched.append(int((counts > 0).sum()))
        clients.append(len(replies))
        return replies

    pool.train = counting  # type: ignore[method-assign]
    started = time.perf_counter()
    with reproducible_torch(1):
        final = federated_server(config, federation, pool, Progress(1, False)).run().final
    return (f"| {least} | {np.mean(clients):.0f} | {np.mean(left_out):.1f} | {np.mean(touched):.0f} | "
            f"{final['HR@10']:.4f} | {final['NDCG@10']:.4f} | {time.perf_counter() - started:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(f"settings: {' '.join(args.set) or 'defaults'}")
    print("| secagg_min_clients | clients per round | rows left out per round | rows touched per round | HR@10 | "
          "NDCG@10 | seconds |\n|--:|--:|--:|--:|--:|--:|--:|")  # fmt: skip
    for least in (1, 2):
        print(run(args.set, least), flush=True)


if __name__ == "__main__":
    main()
