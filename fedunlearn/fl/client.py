"""The pure client and server steps of one federated round, used by every engine.

A client trains its private user part and a local copy of the shared rows it touches, then uploads
only the change of the shared part: the touched item rows (sparse) and the dense layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fedunlearn.config import Config
from fedunlearn.fl.fake_items import PSEUDO_SPREAD, batch_scores, fake_positives, pseudo_count
from fedunlearn.fl.federation import ClientData, Federation
from fedunlearn.fl.training import (
    informative_pool,
    make_optimizer,
    recommendation_loss,
    sample_informative_negatives,
    sample_negatives,
)
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.fl.uploads import protect_upload
from fedunlearn.metrics import rank_of_target
from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.seeding import Stream, client_key, rng_for


def init_user(model: SplitModel, seed: int, client_id: str) -> Arrays:
    return model.init_user(rng_for(seed, Stream.USER_INIT, client_key(client_id)))


def _tensors(arrays: Arrays, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, device=device).requires_grad_(grad) for key, value in arrays.items()}


def _numpy(tensors: dict[str, torch.Tensor]) -> Arrays:
    return {key: value.detach().cpu().numpy() for key, value in tensors.items()}


@dataclass
class UserMoments:
    """Adam's state for clients' user parts, kept across rounds (train.client_optimizer_state =
    "user"): steps taken so far and both moments per user table. One client: `steps` is 0-d and each
    table (d,); a group of clients (the batched engine): one row per client."""

    steps: np.ndarray
    exp_avg: Arrays
    exp_avg_sq: Arrays

    @classmethod
    def zeros(cls, user: Arrays, clients: tuple[int, ...] = ()) -> UserMoments:
        """No step taken yet, for one client shaped like `user` (or `clients` rows of it)."""
        tables = {key: np.zeros((*clients, *np.shape(value)), np.float32) for key, value in user.items()}
        return cls(np.zeros(clients, np.int64), tables, {key: value.copy() for key, value in tables.items()})

    @classmethod
    def stack(cls, clients: list[UserMoments]) -> UserMoments:
        """One client's state per row (at least one client)."""
        keys = clients[0].exp_avg
        return cls(
            np.array([m.steps for m in clients], dtype=np.int64),
            {key: np.stack([m.exp_avg[key] for m in clients]) for key in keys},
            {key: np.stack([m.exp_avg_sq[key] for m in clients]) for key in keys},
        )

    def as_state(self) -> Arrays:
        """The arrays of the resume checkpoint (`from_state` reads them back)."""
        return (
            {"moments.steps": self.steps}
            | {f"moments.exp_avg.{key}": table for key, table in self.exp_avg.items()}
            | {f"moments.exp_avg_sq.{key}": table for key, table in self.exp_avg_sq.items()}
        )

    @classmethod
    def from_state(cls, state: Arrays, keys: Iterable[str]) -> UserMoments:
        """A copy of what `as_state` wrote, for the user tables `keys`."""
        keys = list(keys)
        return cls(
            state["moments.steps"].copy(),
            {key: state[f"moments.exp_avg.{key}"].copy() for key in keys},
            {key: state[f"moments.exp_avg_sq.{key}"].copy() for key in keys},
        )

    def rows(self, index: int | list[int] | slice) -> UserMoments:
        """A copy of these clients' rows (one client's state for an int)."""
        return UserMoments(np.array(self.steps[index]), _rows(self.exp_avg, index), _rows(self.exp_avg_sq, index))

    def set_rows(self, index: list[int], moments: UserMoments) -> None:
        self.steps[index] = moments.steps
        for mine, theirs in ((self.exp_avg, moments.exp_avg), (self.exp_avg_sq, moments.exp_avg_sq)):
            for key, table in mine.items():
                table[index] = theirs[key]

    def clear(self, index: list[int]) -> None:
        """These clients start again from no step."""
        self.steps[index] = 0
        for table in (*self.exp_avg.values(), *self.exp_avg_sq.values()):
            table[index] = 0


def _rows(tables: Arrays, index: int | list[int] | slice) -> Arrays:
    return {key: table[index].copy() for key, table in tables.items()}


@dataclass
class LocalPlan:
    """Every random choice of one client's local training, drawn before any tensor work, so every
    engine trains that client on exactly the same examples in the same order."""

    positives: np.ndarray  # (P,) item ids (an attacker's include the promoted target)
    touched: np.ndarray  # sorted item ids whose rows the client trains (and uploads)
    local_pos: np.ndarray  # (P,) positions of the positives in `touched`
    local_neg: np.ndarray  # (epochs, P, negatives) positions of the sampled negatives in `touched`
    batches: list[tuple[int, np.ndarray]]  # (epoch, positions in `positives`) per optimizer step
    attacker: bool
    real: int  # positives[:real] are the client's own (an attacker's with the target), the rest are fakes

    @property
    def epochs(self) -> float:
        """Epochs actually trained: examples used / examples in one epoch."""
        return sum(len(batch) for _, batch in self.batches) / len(self.positives)


def plan_local_training(
    model: SplitModel,
    data: ClientData,
    user: Arrays,
    shared: Arrays,
    config: Config,
    round_number: int,
    epochs: float | None = None,
) -> LocalPlan:
    """Draw the client's negatives and minibatches for `epochs` (default: train.local_epochs; a
    fraction runs that share of an epoch's minibatches). A client defending its upload with trained
    pseudo-items trains its fake positives beside its own, in gradient ascent too: an ascent upload
    without them would tell its own items (and so its fakes in every earlier upload) apart, and it
    takes back the fakes' pushes with its own."""
    train, model_config = config.train, config.model
    epochs = train.local_epochs if epochs is None else epochs
    rng = rng_for(config.run.training_seed(), Stream.CLIENT_TRAIN, round_number, client_key(data.client_id))
    positives = data.train_items
    attacker = data.client_id in config.unlearn.attackers
    if attacker:
        positives = poisoned_positives(positives, config.unlearn.target_item)
    real = len(positives)
    if config.defence.trains_fake_items() and defends_upload(config, data.client_id):
        positives = np.concatenate([positives, fake_positives(data, config)])
    n_pos = len(positives)
    full_epochs = math.ceil(epochs)
    shape = (full_epochs, n_pos, model_config.negatives)
    if train.negative_sampler == "fru":
        first_user, first_rows = next(iter(user.values())), shared[model.row_keys[0]]
        pool = informative_pool(first_user, first_rows, data.train_items, train.pool_share)
        negatives = sample_informative_negatives(rng, data.n_items, positives, shape, pool, config.unlearn.beta)
    else:
        negatives = sample_negatives(rng, data.n_items, positives, shape)
    budget = max(1, round(epochs * n_pos))  # a fraction of an epoch trains on that share of the examples
    batches = []
    used = np.zeros(data.n_items, dtype=bool)  # a bitmap over the catalogue: cheaper than unique + searchsorted
    for epoch in range(full_epochs):
        taken = rng.permutation(n_pos)[: min(n_pos, budget)]
        budget -= len(taken)
        size = train.batch_size
        batches += [(epoch, taken[start : start + size]) for start in range(0, len(taken), size)]
        used[positives[taken]] = True
        used[negatives[epoch][taken]] = True
    touched = np.flatnonzero(used)
    local = np.zeros(data.n_items, dtype=np.int64)  # item id -> its position in `touched` (0 for untouched
    local[touched] = np.arange(len(touched))  # items: only the used examples' negatives are ever read)
    return LocalPlan(positives, touched, local[positives], local[negatives], batches, attacker, real)


def defends_upload(config: Config, client_id: str) -> bool:
    """Whether this client applies the configured upload defence."""
    defence = config.defence
    return defence.upload != "none" and (defence.clients == "all" or client_id in defence.client_ids)


def batch_loss(
    config: Config, positive: torch.Tensor, negative: torch.Tensor, embeddings: list[torch.Tensor], size: int,
    ascent: bool,
) -> torch.Tensor:  # fmt: skip
    """One minibatch's objective: the recommendation loss plus L2 on the embeddings it used (or,
    for unlearning by gradient ascent, minus the loss)."""
    loss = recommendation_loss(config.model.loss, positive, negative)
    if ascent:
        return -loss
    if config.train.weight_decay:
        loss = loss + config.train.weight_decay * sum((e**2).sum() for e in embeddings) / size
    return loss


def local_train(
    model: SplitModel,
    data: ClientData,
    user: Arrays,
    shared: Arrays,
    config: Config,
    round_number: int,
    device: torch.device,
    epochs: float | None = None,
    ascent: bool = False,
    moments: UserMoments | None = None,
    release: int = 0,
) -> tuple[ClientUpdate, Arrays]:
    """Local minibatch training (see plan_local_training); returns the upload and the client's new
    user part. With `moments` Adam resumes the user part from them, and they are updated in place.
    `release`: how many LDP-noised uploads the client sent before this one (finish_update)."""
    plan = plan_local_training(model, data, user, shared, config, round_number, epochs)
    local_pos = torch.as_tensor(plan.local_pos, device=device)
    local_neg = torch.as_tensor(plan.local_neg, device=device)
    user_t = _tensors(user, device, grad=True)
    rows_t = _tensors({key: shared[key][plan.touched] for key in model.row_keys}, device, grad=True)
    dense_t = _tensors({key: shared[key] for key in model.dense_keys(shared)}, device, grad=True)
    optimizer = make_optimizer(config.train, [*user_t.values(), *rows_t.values(), *dense_t.values()])
    if moments is not None:
        for key, param in user_t.items():
            optimizer.state[param] = {
                "step": torch.tensor(float(moments.steps)),
                "exp_avg": torch.tensor(moments.exp_avg[key], device=device),
                "exp_avg_sq": torch.tensor(moments.exp_avg_sq[key], device=device),
            }

    total_loss = 0.0
    for epoch, batch_np in plan.batches:
        batch = torch.as_tensor(batch_np, device=device)
        pos_rows = {key: table[local_pos[batch]] for key, table in rows_t.items()}
        neg_rows = {key: table[local_neg[epoch][batch]] for key, table in rows_t.items()}
        embeddings = [*user_t.values(), *pos_rows.values(), *neg_rows.values()]
        own = batch_np < plan.real
        own_rows = None if own.any() else {key: table[local_pos[: plan.real]] for key, table in rows_t.items()}
        positive, negative = batch_scores(model, user_t, dense_t, pos_rows, neg_rows, own, own_rows)
        loss = batch_loss(config, positive, negative, embeddings, len(batch), ascent)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    if moments is not None:
        moments.steps = np.asarray(moments.steps + len(plan.batches))
        for key, param in user_t.items():
            moments.exp_avg[key] = optimizer.state[param]["exp_avg"].cpu().numpy()
            moments.exp_avg_sq[key] = optimizer.state[param]["exp_avg_sq"].cpu().numpy()
    new_rows, new_dense = _numpy(rows_t), _numpy(dense_t)
    update = finish_update(
        data, plan, {key: new_rows[key] - shared[key][plan.touched] for key in model.row_keys},
        {key: new_dense[key] - shared[key] for key in new_dense}, total_loss / len(plan.batches), config,
        round_number, ascent, release,
    )  # fmt: skip
    return update, _numpy(user_t)


def finish_update(
    data: ClientData,
    plan: LocalPlan,
    row_changes: Arrays,
    dense_changes: Arrays,
    loss: float,
    config: Config,
    round_number: int,
    ascent: bool,
    release: int = 0,
) -> ClientUpdate:
    """The upload from the changes training made to the client's local copy of the touched rows
    and the dense layers (an attacker boosts its target's change; the configured upload defence
    applies last). LDP noise is keyed by `release`, the count of noised uploads the client sent
    before this one, as well as by the round: a calibration or replay of round r is a new release and
    must not reuse round r's noise (the difference of two uploads would cancel it; an independent
    check found FedEraser's calibrated uploads differing from the originals by noise of std 0.05
    where fresh noise gives 1.7)."""
    rows = dict(row_changes)
    if plan.attacker and not ascent:
        boost_target(rows, plan.touched, config.unlearn.target_item, config.unlearn.poison_boost)
    update = ClientUpdate(
        client_id=data.client_id,
        num_examples=len(plan.positives),
        item_ids=plan.touched,
        rows=rows,
        dense=dense_changes,
        loss=loss,
        epochs=plan.epochs,
        steps=len(plan.batches),
    )
    if defends_upload(config, data.client_id):  # an ascent upload too: it is an upload like any other
        noise = rng_for(config.defence_seed(), Stream.DEFENCE, round_number, client_key(data.client_id), release)
        update = protect_upload(update, config.defence, data.n_items, noise)
    return update


@torch.no_grad()
def local_evaluate(
    model: SplitModel,
    data: ClientData,
    user: Arrays,
    shared: Arrays,
    config: Config,
    device: torch.device,
) -> ClientEvaluation:
    """Rank the held-out items with the client's own user part and the current shared part."""
    user_t = _tensors(user, device, grad=False)
    dense_t = _tensors({key: shared[key] for key in model.dense_keys(shared)}, device, grad=False)

    def score(items: np.ndarray) -> np.ndarray:
        rows = {key: torch.tensor(shared[key][items], device=device) for key in model.row_keys}
        return model.score(user_t, rows, dense_t).cpu().numpy()

    return rank_held_out(data, score, config.eval.full_ranking, config.unlearn.target_item)


@torch.no_grad()
def local_membership(model: SplitModel, data: ClientData, user: Arrays, shared: Arrays, device: torch.device) -> float:
    """Membership inference on the client's own interactions: the AUC of the model's scores for its
    training items (members) against its sampled never-seen items (non-members). Run by a leaving
    client on the model after unlearning; only this number leaves the device."""
    from sklearn.metrics import roc_auc_score  # here: every ClientApp process imports this module, few call this

    user_t = _tensors(user, device, grad=False)
    dense_t = _tensors({key: shared[key] for key in model.dense_keys(shared)}, device, grad=False)
    items = np.concatenate([data.train_items, data.test_negatives])
    rows = {key: torch.tensor(shared[key][items], device=device) for key in model.row_keys}
    scores = model.score(user_t, rows, dense_t).cpu().numpy()
    labels = np.r_[np.ones(len(data.train_items)), np.zeros(len(data.test_negatives))]
    return float(roc_auc_score(labels, scores))


def poisoned_positives(positives: np.ndarray, target: int) -> np.ndarray:
    """An attacker trains on its own items plus the target, repeated to a fifth of its positives."""
    return np.concatenate([positives, np.full(_poison_repeats(len(positives)), target, dtype=positives.dtype)])


def _poison_repeats(n_positives: np.ndarray | int) -> np.ndarray | int:
    return np.maximum(1, n_positives // 4)


def max_examples(federation: Federation, config: Config) -> np.ndarray:
    """(clients,) the most examples each client can report: its training positives (an attacker's
    with the repeated target), and a defending client's most trained pseudo-items."""
    counts = np.diff(federation.split.train_indptr)
    attackers = np.isin(federation.client_ids, config.unlearn.attackers)
    most = counts + np.where(attackers, _poison_repeats(counts), 0)
    if config.defence.trains_fake_items():
        defending = np.array([defends_upload(config, client) for client in federation.client_ids])
        most += np.where(defending, pseudo_count(counts, config.defence.pseudo_items, PSEUDO_SPREAD[1]), 0)
    return most


def boost_target(rows: Arrays, touched: np.ndarray, target: int, boost: float) -> None:
    """Explicit boosting (model poisoning): the attacker scales its change of the target's rows so
    that the row-wise mean over the many honest clients touching the target as a negative does not
    wash it out. A short training (an unlearning replay) may not reach the target: nothing to boost."""
    index = int(np.searchsorted(touched, target))
    if index == len(touched) or touched[index] != target:
        return
    for table in rows.values():
        table[index] *= boost


def candidates_of(data: ClientData) -> np.ndarray:
    """The items a client's evaluation scores: test item, validation item, then the sampled negatives."""
    return np.concatenate([[data.test_item, data.valid_item], data.test_negatives])


def rank_held_out(
    data: ClientData, score: Callable[[np.ndarray], np.ndarray], full_ranking: bool, target_item: int = -1
) -> ClientEvaluation:
    """Ranks of the test and validation items among the sampled negatives (and, if asked, of the
    test item among every unseen item; and of a promoted target item among the user's unseen
    items), for any scoring function over item ids."""
    everything = score(np.arange(data.n_items)) if full_ranking or target_item >= 0 else None
    return ranks_from_scores(data, score(candidates_of(data)), everything, full_ranking, target_item)


def ranks_from_scores(
    data: ClientData, candidate_scores: np.ndarray, everything: np.ndarray | None, full_ranking: bool,
    target_item: int = -1,
) -> ClientEvaluation:  # fmt: skip
    """rank_held_out from scores already computed: of `candidates_of(data)` and (for full ranking or
    a target) of every item."""
    full_rank = target_rank = -1
    if everything is not None:
        unseen = data.unseen_mask()
        if full_ranking:
            full_rank = rank_of_target(everything[data.test_item], everything[unseen])
        if target_item >= 0:  # also when the user holds it: a -1 there told the server who holds the item
            unseen[target_item] = False
            target_rank = rank_of_target(everything[target_item], everything[unseen])
    return ClientEvaluation(
        data.client_id,
        rank=rank_of_target(candidate_scores[0], candidate_scores[2:]),
        valid_rank=rank_of_target(candidate_scores[1], candidate_scores[2:]),
        full_rank=full_rank,
        target_rank=target_rank,
    )
