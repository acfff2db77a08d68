"""Can a curious server tell a client's own items from its pseudo-items? Per `defence.pseudo_rows`
mode, one federation each, the server's attackers on the client's own training items against its
fake items, from what the server holds (its uploads):

- residual, neighbour: how far a row lies from the upload's rank-one fit, and from its nearest
  other row (privacy.upload_attack.own_row_scores);
- rounds: in how many of the client's uploads the item was sent (fakes drawn afresh each round come
  back rarely, a client's own items every time);
- cosine over rounds: the mean, over the rounds the item was sent, of its row change's cosine to
  the direction recovered from that round's upload (the weight decay pulls a row along itself, and
  an own item's row lies nearer the user part than a fake's);
- popularity: how many clients sent the item in the last round (a client's own items are popular
  ones, fakes drawn uniformly are not);
- model score: the item's score under the model the server sent, for the direction it recovers
  from the upload (the user part fits its own items, not its fakes);
- the shipped sign-split attack's precision at reading own items (privacy.upload_attack).

AUC per client over its own items (1) and its fake items (0), the median over the clients of the
last round: 0.5 is "told apart at chance", and below 0.5 is told apart as much, with the sign flipped.

    python benchmarks/pseudo_items.py [--modes gaussian,mimic,trained] [--set KEY=VALUE ...]
    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/pseudo_items.py --set data.dataset=ml-100k
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from fedunlearn.config import load_config
from fedunlearn.engines.inprocess import InProcessPool
from fedunlearn.fl import uploads
from fedunlearn.fl.fake_items import fake_positives
from fedunlearn.fl.federation import Federation, build_federation
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.privacy.upload_attack import own_row_scores, recover_from_upload
from fedunlearn.progress import Progress
from fedunlearn.runs.assembly import federated_server, reproducible_torch

ATTACKERS = ("residual", "neighbour", "rounds", "cosine over rounds", "popularity", "model score")
SMALL = ["data.synthetic_users=300", "data.synthetic_items=1000", "train.rounds=10", "eval.every=10"]


class Observer:
    """What the server accumulates from every round's uploads, per client and item: in how many
    rounds the item was sent, and the sum of its row's cosine to the direction recovered from that
    round's upload; the last round's uploads, and the model sent for it."""

    def __init__(self, federation: Federation) -> None:
        self.position = {client: i for i, client in enumerate(federation.client_ids)}
        self.sent = np.zeros((federation.n_clients, federation.n_items))
        self.cosines = np.zeros((federation.n_clients, federation.n_items))
        self.last: dict[str, ClientUpdate] = {}
        self.model: dict = {}

    def round(self, shared: dict, replies: list) -> None:
        self.model = shared
        self.last = {reply.value.client_id: reply.value for reply in replies if reply.value is not None}
        for client, update in self.last.items():
            rows = np.concatenate(list(update.rows.values()), axis=1).astype(np.float64)
            direction = recover_from_upload(update, tuple(update.rows))[0]
            at = self.position[client]
            self.sent[at, update.item_ids] += 1
            self.cosines[at, update.item_ids] += rows @ direction / np.maximum(np.linalg.norm(rows, axis=1), 1e-30)


def run(mode: str, overrides: list[str]) -> tuple[Federation, Observer, dict[str, np.ndarray], dict]:
    """Train one federation, observed round by round; each client's fakes; the run's final metrics."""
    config = load_config(None, [*overrides, "defence.upload=pseudo-items", f"defence.pseudo_rows={mode}",
                                "run.engine=inprocess"])  # fmt: skip
    federation = build_federation(config.data, config.run.seed)
    pool = InProcessPool(config, federation)
    observer = Observer(federation)
    train = pool.train

    def train_and_observe(round_number, clients, shared, *args, **kwargs):
        replies = train(round_number, clients, shared, *args, **kwargs)
        observer.round(shared, replies)
        return replies

    pool.train = train_and_observe  # type: ignore[method-assign]
    padded: dict[str, np.ndarray] = {}
    pad = uploads.pad_pseudo_items

    def pad_and_note(update: ClientUpdate, *args, **kwargs) -> ClientUpdate:
        sent = pad(update, *args, **kwargs)
        padded[update.client_id] = np.setdiff1d(sent.item_ids, update.item_ids)
        return sent

    uploads.pad_pseudo_items = pad_and_note  # the padded fakes of the last round, known to the benchmark only
    try:
        with reproducible_torch(1):
            result = federated_server(config, federation, pool, Progress(config.train.rounds, False)).run()
    finally:
        uploads.pad_pseudo_items = pad
    if mode == "trained":
        padded = {federation.client_ids[i]: fake_positives(federation.client(i), config) for i in
                  range(federation.n_clients)}  # fmt: skip
    return federation, observer, padded, result.final


def scores(update: ClientUpdate, observer: Observer, popularity: np.ndarray) -> dict[str, np.ndarray]:
    keys, at, items = tuple(update.rows), observer.position[update.client_id], update.item_ids
    direction = recover_from_upload(update, keys)[0]
    rows = np.concatenate([observer.model[key][items] for key in keys], axis=1)
    return own_row_scores(update, keys) | {
        "rounds": observer.sent[at, items],
        "cosine over rounds": observer.cosines[at, items] / observer.sent[at, items],
        "popularity": popularity[items],
        "model score": rows @ direction,
    }


def measure(mode: str, overrides: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    federation, observer, fakes, final = run(mode, overrides)
    popularity = np.zeros(federation.n_items)
    for update in observer.last.values():
        popularity[update.item_ids] += 1
    aucs: dict[str, list[float]] = {name: [] for name in ATTACKERS}
    precision = []
    for client, update in observer.last.items():
        own_items = federation.client(observer.position[client]).train_items
        own, fake = np.isin(update.item_ids, own_items), np.isin(update.item_ids, fakes[client])
        if not own.any() or not fake.any():
            continue
        for name, score in scores(update, observer, popularity).items():
            aucs[name].append(roc_auc_score(own[own | fake], score[own | fake]))
        read = recover_from_upload(update, tuple(update.rows))[1]
        precision.append(np.isin(read, own_items).mean() if len(read) else 0.0)
    figures = {name: float(np.median(values)) for name, values in aucs.items()}
    return figures | {"sign-split precision": float(np.mean(precision)), "HR@10": final["HR@10"],
                      "clients": len(precision), "seconds": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="gaussian,mimic,trained")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [*SMALL, *args.set]
    print(f"settings: {' '.join(overrides)}")
    header = ["mode", *ATTACKERS, "sign-split precision", "HR@10", "clients", "seconds"]
    print("| " + " | ".join(header) + " |\n|" + "--:|" * len(header))
    for mode in args.modes.split(","):
        figures = measure(mode, overrides)
        cells = [f"{figures[name]:.3f}" for name in header[1:-2]]
        print(f"| {mode} | " + " | ".join(cells) + f" | {figures['clients']} | {figures['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
