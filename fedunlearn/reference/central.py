"""Centralized training of the same models on the same split: the reference for federated numbers."""

from __future__ import annotations

import time

import numpy as np
import torch

from fedunlearn.config import Config, derive
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.client import batch_loss, init_user, local_evaluate
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.rounds import FederationResult, check_loss_growth, evaluation_metrics, select_final
from fedunlearn.fl.training import resolve_device
from fedunlearn.models import build_model
from fedunlearn.progress import Progress
from fedunlearn.seeding import Stream, rng_for


def sample_pair_negatives(
    rng: np.random.Generator, users: np.ndarray, n_items: int, positive_keys: np.ndarray, count: int
) -> np.ndarray:
    """For each (user, positive) pair, `count` items that user has not trained on, by rejection.
    `positive_keys` are the sorted codes user * n_items + item of every training positive."""
    out = rng.integers(0, n_items, size=(len(users), count))
    owner = np.repeat(users, count).reshape(out.shape)

    def clash(items: np.ndarray, who: np.ndarray) -> np.ndarray:
        keys = who * n_items + items
        pos = np.searchsorted(positive_keys, keys).clip(max=len(positive_keys) - 1)
        return positive_keys[pos] == keys

    bad = clash(out, owner)
    while bad.any():
        out[bad] = rng.integers(0, n_items, size=int(bad.sum()))
        bad[bad] = clash(out[bad], owner[bad])
    return out


def train_central(config: Config, federation: Federation, progress: Progress) -> FederationResult:
    """Adam over every (user, positive, negatives) example of the clients in the federation (not those
    of data.exclude_clients, who are not scored either); user and item parts trained jointly (large
    batches: the caller runs it under `run.num_cpus` torch threads). The loss is federated training's
    form: the recommendation loss plus the L2 of the embeddings each minibatch uses
    (fl.client.batch_loss), with `central.weight_decay` (default: train.weight_decay); a minibatch
    here mixes users, so a user embedding's term is counted once per pair, not once per minibatch as
    on a client (up to train.batch_size times more; on ML-100K MF seed 0 weighting it down to a
    client's gave the same HR@10, 0.6511, and NDCG@10 0.3792 against 0.3806). Adam's own
    weight decay would shrink every row at every step, rows the batch never used included: at
    train.weight_decay's 0.001 it drove ML-100K's item table to zero in 15 epochs."""
    device = resolve_device(config.run.device)
    seed = config.run.training_seed()
    model = build_model(config.model, federation.n_items)
    split = federation.split
    shared0 = model.init_shared(rng_for(seed, Stream.SHARED_INIT))
    users0 = [init_user(model, seed, client_id) for client_id in federation.client_ids]
    user_tables = {
        key: torch.tensor(np.stack([u[key] for u in users0]), device=device, requires_grad=True) for key in users0[0]
    }
    shared = {key: torch.tensor(value, device=device, requires_grad=True) for key, value in shared0.items()}
    optimizer = torch.optim.Adam([*user_tables.values(), *shared.values()], lr=config.central.lr)
    decay = config.central.weight_decay if config.central.weight_decay >= 0 else config.train.weight_decay
    objective = derive(config, {"train.weight_decay": decay})  # batch_loss reads train.weight_decay
    clients = federation.kept(config.data.exclude_clients)
    pair_users, pair_items = split.pairs_of(clients)
    positive_keys = np.sort(pair_users * federation.n_items + pair_items)
    rng = rng_for(seed, Stream.CENTRAL)
    dense_keys = model.dense_keys(shared0)
    result = FederationResult()
    started = time.perf_counter()
    epochs = config.central.epochs
    epoch_losses: list[float] = []
    for epoch in range(1, epochs + 1):
        progress.start_round(epoch)
        progress.start_call(len(pair_users), "training")
        negatives = sample_pair_negatives(rng, pair_users, federation.n_items, positive_keys, config.model.negatives)
        order = rng.permutation(len(pair_users))
        losses = []
        for start in range(0, len(order), config.central.batch_size):
            batch = order[start : start + config.central.batch_size]
            u = torch.as_tensor(pair_users[batch], device=device)
            i = torch.as_tensor(pair_items[batch], device=device)
            j = torch.as_tensor(negatives[batch], device=device)
            user = {key: table[u] for key, table in user_tables.items()}
            user_neg = {key: value.unsqueeze(1) for key, value in user.items()}
            dense = {key: shared[key] for key in dense_keys}
            pos_rows = {key: shared[key][i] for key in model.row_keys}
            neg_rows = {key: shared[key][j] for key in model.row_keys}
            pos, neg = model.score(user, pos_rows, dense), model.score(user_neg, neg_rows, dense)
            embeddings = [*user.values(), *pos_rows.values(), *neg_rows.values()]
            loss = batch_loss(objective, pos, neg, embeddings, len(batch), ascent=False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.client_done(len(batch))
        finite = np.isfinite(losses).all() and all(bool(torch.isfinite(value).all()) for value in shared.values())
        if not finite:  # a diverged model must never be scored
            raise FedUnlearnError(f"central training diverged in epoch {epoch} (non-finite loss or parameters): "
                                  "lower central.lr")  # fmt: skip
        epoch_losses.append(float(np.mean(losses)))
        check_loss_growth(epoch_losses, config.train.max_loss_growth, f"central epoch {epoch}", "epoch 1", "central.lr")
        if epoch % config.eval.every == 0 or epoch == epochs:
            row = _evaluate(config, federation, model, user_tables, shared, clients)
            row = {
                "round": epoch,
                "train_loss": epoch_losses[-1],
                **row,
                "seconds": time.perf_counter() - started,
            }
            result.rounds.append(row)
            progress.evaluated(row)
        progress.end_round()
    result.final = select_final(result.rounds, config.eval.select)
    result.losses = epoch_losses
    result.shared = {key: value.detach().cpu().numpy() for key, value in shared.items()}
    return result


def _evaluate(config, federation, model, user_tables, shared, clients) -> dict[str, float]:  # type: ignore[no-untyped-def]
    device = resolve_device(config.run.device)
    shared_np = {key: value.detach().cpu().numpy() for key, value in shared.items()}
    tables = {key: value.detach().cpu().numpy() for key, value in user_tables.items()}
    evaluations = [
        local_evaluate(
            model,
            federation.client(u),
            {key: table[u] for key, table in tables.items()},
            shared_np,
            config,
            device,
        )
        for u in clients
    ]
    return evaluation_metrics(evaluations, config.eval.ks, config.eval.full_ranking)
