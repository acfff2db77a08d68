"""What the server accepts from a client: every reply is checked before it touches the model or
the history, on every engine; a rejected reply is dropped from its round and counted by reason.

A pool returns one `Reply` per answer it got, tagged with the client the *transport* says sent it
(the federation index the pool asked; on Flower, the node-to-client map), never the id the client
writes into its reply: a client that claims another's id is caught here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models.base import Arrays, SplitModel

T = TypeVar("T", ClientUpdate, ClientEvaluation)

LOSS_CAP = 100.0  # a client loss above this is a diverged run (a secure-aggregation client refuses to send it)

# why a reply was rejected
FAILED = "exception"  # the client raised instead of replying
TIMEOUT = "timeout"  # no reply within train.reply_timeout (Flower)
REASONS = (
    FAILED,
    TIMEOUT,
    "unexpected",  # from a client the server did not ask
    "duplicate",  # a second reply from the same client in one call
    "spoof_id",  # the client id written in the reply is not the sender's
    "nan",
    "inf",
    "loss",  # a training loss outside [0, LOSS_CAP] ([-LOSS_CAP, 0] for gradient ascent)
    "shape",  # missing / extra tensors, wrong shapes or dtypes
    "item_range",  # item ids outside the catalogue, repeated, or not integers
    "num_examples",  # not a whole number in 1 .. what the client holds
    "epochs",  # more examples trained on than the call asked for (its epochs x examples, at least one)
    "steps",  # optimizer steps not in 1 .. ceil(examples / train.batch_size) per epoch asked
    "norm",  # an upload over train.reject_norm_ratio x the round's median norm
    "rank_range",  # an evaluation rank outside what the client can rank, or of a target the run has not
    "auc_range",  # a membership AUC that is not a number in [0, 1], or from a client not leaving
)


@dataclass
class Reply(Generic[T]):
    """One answer from the client at federation index `sender`: its value, or why there is none."""

    sender: int
    value: T | None = None
    failure: str = ""  # FAILED or TIMEOUT when no value came
    detail: str = ""  # the client's error message, for the run's error if every reply fails


@dataclass
class ReplyLimits:
    """What a well-formed reply can hold, as the server knows it."""

    client_ids: list[str]
    shapes: dict[str, tuple[int, ...]]  # shared tensor -> shape (row tables: (items, d))
    row_keys: tuple[str, ...]
    max_examples: np.ndarray  # (clients,) the most positives each client can train on
    test_negatives: int
    n_items: int
    full_ranking: bool
    target: bool = False  # a promoted item is ranked (unlearn.poison): else every target rank is -1
    batch_size: int = 1  # train.batch_size
    epochs: float = 1.0  # what the training call asks for (Federation.train_clients sets it per call)
    ascent: bool = False  # the call is gradient ascent (its loss is minus the training loss)

    @classmethod
    def of(cls, model: SplitModel, shared: Arrays, client_ids: list[str], max_examples: np.ndarray,
           test_negatives: int, full_ranking: bool, target: bool = False,
           batch_size: int = 1) -> ReplyLimits:  # fmt: skip
        shapes = {key: tuple(value.shape) for key, value in shared.items()}
        return cls(client_ids, shapes, tuple(model.row_keys), max_examples, test_negatives, model.n_items, full_ranking,
                   target, batch_size)  # fmt: skip


def _values_problem(arrays: list[np.ndarray]) -> str:
    if any(not np.issubdtype(array.dtype, np.floating) for array in arrays):
        return "shape"
    broken = [array for array in arrays if not np.isfinite(array).all()]  # one pass over the common case
    if not broken:
        return ""
    return "nan" if any(np.isnan(array).any() for array in broken) else "inf"


def layout_problem(update: ClientUpdate, n_items: int, shapes: dict[str, tuple[int, ...]], row_keys: tuple[str, ...]
                   ) -> str:  # fmt: skip
    """'item_range' or 'shape' when the upload's item ids or tensors do not fit the model ('' when
    they do): the server's check of every reply, and a secure-aggregation client's before it adds
    its upload to a sum where a misplaced row would go unseen (fl.secure_round)."""
    ids = np.asarray(update.item_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return "item_range"
    increasing = len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())  # as clients send them: then unique
    repeated = not increasing and len(np.unique(ids)) != len(ids)
    if len(ids) and (ids.min() < 0 or ids.max() >= n_items or repeated):
        return "item_range"
    dense_keys = set(shapes) - set(row_keys)
    if set(update.rows) != set(row_keys) or set(update.dense) != dense_keys:
        return "shape"
    for key, value in update.rows.items():
        if np.shape(value) != (len(ids), shapes[key][1]):
            return "shape"
    for key, value in update.dense.items():
        if np.shape(value) != shapes[key]:
            return "shape"
    return ""


def update_problem(update: ClientUpdate, sender: int, limits: ReplyLimits) -> str:
    """Why this upload cannot be used ('' when it can), before any comparison with other replies."""
    if update.client_id != limits.client_ids[sender]:
        return "spoof_id"
    problem = layout_problem(update, limits.n_items, limits.shapes, limits.row_keys)
    if problem:
        return problem
    problem = _values_problem([*update.rows.values(), *update.dense.values(), np.array([update.loss, update.epochs])])
    if problem:
        return problem
    if not 1 <= update.num_examples <= limits.max_examples[sender] or update.num_examples != int(update.num_examples):
        return "num_examples"
    return loss_problem(update, limits.ascent) or cost_problem(update, limits.epochs, limits.batch_size)


def loss_problem(update: ClientUpdate, ascent: bool = False) -> str:
    """'loss' when the training loss lies outside [0, LOSS_CAP] ([-LOSS_CAP, 0] for gradient ascent)."""
    low, high = (-LOSS_CAP, 0.0) if ascent else (0.0, LOSS_CAP)
    return "" if low <= update.loss <= high else "loss"


def cost_problem(update: ClientUpdate, epochs: float, batch_size: int) -> str:
    """'epochs' or 'steps' when the reply claims more training than a call asking for `epochs` can
    give (claimed costs count in the unlearning tables): a client trains on round(epochs x examples)
    examples, at least one, in minibatches of `batch_size` (fl.client.plan_local_training)."""
    asked = max(1.0, math.floor(epochs * update.num_examples + 0.5))
    if not 0 < update.epochs * update.num_examples <= asked + 1e-6:
        return "epochs"
    most = math.ceil(update.num_examples / batch_size) * max(1, math.ceil(epochs))
    if not 1 <= update.steps <= most or update.steps != int(update.steps):
        return "steps"
    return ""


def evaluation_problem(evaluation: ClientEvaluation, sender: int, limits: ReplyLimits) -> str:
    if evaluation.client_id != limits.client_ids[sender]:
        return "spoof_id"
    ranked = (evaluation.rank, evaluation.valid_rank)
    if not all(_whole(rank) for rank in (*ranked, evaluation.full_rank, evaluation.target_rank)):
        return "rank_range"
    if not all(0 <= rank <= limits.test_negatives for rank in ranked):
        return "rank_range"
    full_ok = 0 <= evaluation.full_rank < limits.n_items if limits.full_ranking else evaluation.full_rank == -1
    target_ok = -1 <= evaluation.target_rank < limits.n_items if limits.target else evaluation.target_rank == -1
    return "" if full_ok and target_ok else "rank_range"


def _whole(value: object) -> bool:
    """A finite whole number (a rank or a count), whatever numeric type carried it."""
    numeric = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    return numeric and math.isfinite(value) and value == int(value)  # type: ignore[arg-type]


def _norms(update: ClientUpdate) -> dict[str, float]:
    return {key: float(np.linalg.norm(value)) for key, value in {**update.rows, **update.dense}.items()}


def _median(norms: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([n[key] for n in norms])) for key in norms[0]} if norms else {}


def median_norms(updates: list[ClientUpdate]) -> dict[str, float]:
    """Each shared tensor's median norm over these uploads."""
    return _median([_norms(update) for update in updates])


def over_median_norm(updates: list[ClientUpdate], ratio: float) -> list[bool]:
    """Whether each upload has a tensor whose norm is over `ratio` x that tensor's median norm in
    this batch (0: never). The median ignores a minority of outliers, so one huge upload cannot
    raise its own bar."""
    if ratio <= 0 or not updates:
        return [False] * len(updates)
    norms = [_norms(update) for update in updates]
    median = _median(norms)
    return [any(n[key] > ratio * median[key] for key in median if median[key] > 0) for n in norms]


def check_replies(
    replies: list[Reply[T]], asked: list[int], limits: ReplyLimits, norm_ratio: float = 0.0
) -> tuple[list[T], Counter[str], list[str]]:
    """The usable values (in reply order), the rejected replies counted by reason, and the details
    of the clients' failures."""
    rejected: Counter[str] = Counter()
    details = [reply.detail for reply in replies if reply.failure and reply.detail]
    expected, seen = set(asked), set()
    kept: list[Reply[T]] = []
    for reply in replies:
        if reply.sender not in expected:
            problem = "unexpected"
        elif reply.sender in seen:
            problem = "duplicate"
        elif reply.failure:
            problem = reply.failure
        elif isinstance(reply.value, ClientUpdate):
            problem = update_problem(reply.value, reply.sender, limits)
        else:
            problem = evaluation_problem(reply.value, reply.sender, limits)
        seen.add(reply.sender)
        if problem:
            rejected[problem] += 1
        else:
            kept.append(reply)
    values = [reply.value for reply in kept]
    if values and isinstance(values[0], ClientUpdate):
        outliers = over_median_norm(values, norm_ratio)  # type: ignore[arg-type]
        rejected["norm"] += sum(outliers)
        values = [value for value, outlier in zip(values, outliers, strict=True) if not outlier]
    return values, +rejected, details  # type: ignore[return-value]
