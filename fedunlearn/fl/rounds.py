"""The server's round loop, independent of how messages reach the clients.

Every engine supplies a `ClientPool`; the loop (sampling, aggregation, evaluation schedule, drop
events and the unlearning methods' calibration rounds) is this one class, so the Flower path and
the in-process runner cannot drift apart.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fedunlearn.config import Config, audits_privacy, derive, differing_keys
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.aggregation import apply_delta
from fedunlearn.fl.checkpoint import Checkpoint, prefixed, unprefixed
from fedunlearn.fl.client import defends_upload, max_examples
from fedunlearn.fl.comparison import compare_with_retrain, initial_key
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.history import HistoryStore
from fedunlearn.fl.replies import FAILED, LOSS_CAP, Reply, ReplyLimits, check_replies, median_norms
from fedunlearn.fl.robust import server_delta
from fedunlearn.fl.secure_round import SECURE_UPLOAD, SecureLayout, require_secure_quorum, secure_quorum
from fedunlearn.fl.server_optimizer import row_optimizer
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate, rescale_tensors
from fedunlearn.metrics import hit_ratio, ranking_metrics
from fedunlearn.models import build_model
from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.progress import Progress
from fedunlearn.seeding import Stream, client_uniforms, rng_for

ProgressHook = Callable[[int], None]
Unlearner = Callable[["FederatedServer", int, list[int]], Arrays]  # (server, round, forgotten) -> shared
UploadReader = Callable[[list[ClientUpdate], dict[str, int], int, int, tuple[str, ...]], Arrays]


@dataclass(frozen=True)
class ServerPlugins:
    """What the layers above lend the round loop, which knows none of them: the unlearning methods by
    name (`unlearning.methods.load_methods`), and the audit's reading of the last round's uploads
    (`privacy.upload_attack.upload_view`: uploads, client positions, clients, items, row tables)."""

    methods: Mapping[str, Unlearner] = field(default_factory=dict)
    read_uploads: UploadReader | None = None


class ClientPool(Protocol):
    """Runs the client steps on the chosen clients (by federation index) and returns their replies,
    each tagged with the client the transport says sent it; the server checks them (replies.py)."""

    config: Config  # what the clients are told to run (the server may change the training draws)

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
        releases: Sequence[int] | None = None,
    ) -> list[Reply[ClientUpdate]]:
        """`releases`: per client, the LDP-noised uploads it sent before (fl.client.finish_update)."""
        ...

    def train_summed(
        self, round_number: int, clients: list[int], shared: Arrays, done: ProgressHook, layout: SecureLayout
    ) -> tuple[list[int], list[Reply[ClientUpdate]], np.ndarray]:
        """Secure aggregation (fl/secure_round.py): the clients train as in `train`, and the server
        receives only the sum of their `layout` contributions: (who contributed, the failed replies,
        the sum)."""
        ...

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]: ...

    def membership(self, clients: list[int], shared: Arrays) -> dict[str, float]: ...

    def forget(self, clients: list[int]) -> None: ...

    def fork(self) -> ClientPool:
        """A pool whose clients' private state can change without touching this one's (compare)."""
        ...

    def release(self) -> None:
        """A fork is done with: drop what it holds (a Flower fork's branches live on the clients)."""
        ...


@dataclass
class FederationResult:
    rounds: list[dict[str, float]] = field(default_factory=list)  # one row per evaluated round
    losses: list[float] = field(default_factory=list)  # every round's (central: epoch's) mean training loss
    final: dict[str, float] = field(default_factory=dict)
    shared: Arrays = field(default_factory=dict)
    round_ends: list[float] = field(default_factory=list)  # wall-clock time.time() at the end of each round
    round_clients: list[int] = field(default_factory=list)  # clients sampled in each round
    events: list[dict[str, Any]] = field(default_factory=list)  # drop events: who, when, method, cost, audit
    unlearned: Arrays = field(default_factory=dict)  # shared parameters right after the last unlearning
    comparison: list[dict[str, Any]] = field(default_factory=list)  # every method at every event, a block each
    uploads: Arrays | None = None  # the server's view of each last-round upload (privacy.upload_attack.upload_view)
    privacy: Any = None  # fedunlearn.privacy.stage.PrivacyReport when attribute privacy was audited
    defence: dict[str, Any] = field(default_factory=dict)  # Flower, a defence without the audit: what it cost
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # "updates" / "evaluations": by reason
    ldp_uploads: int = 0  # the most LDP-noised uploads one client sent (defence.upload with ldp)
    earlier_seconds: float = 0.0  # a resumed run: the rounds' seconds its interrupted legs had run


@dataclass
class RoundSeen:
    """What the server saw of a round: the clients' mean training loss, and the uploads as it holds
    them (each client's own; under secure aggregation only the round's mean change, for everyone)."""

    loss: float
    uploads: list[ClientUpdate]


COMPARED = ("HR@10", "NDCG@10", "ER@10", "HR@10_active", "HR@10_inactive", "NDCG@10_active", "NDCG@10_inactive")


def _by_client(reply: ClientUpdate | ClientEvaluation) -> str:
    return reply.client_id


def require_finite(arrays: Arrays, where: str) -> None:
    """Stop the run when a shared tensor holds NaN or inf: a diverged model must never be scored."""
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            raise FedUnlearnError(
                f"training diverged {where}: non-finite shared parameters ({key}); "
                "lower train.lr or train.server_lr, or use train.optimizer=adam"
            )


def fresh_counts() -> dict[str, Counter[str]]:
    """Rejected replies by reason, for each kind of reply the server checks."""
    return {"updates": Counter(), "evaluations": Counter(), "membership": Counter()}


def reasons_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))


def check_loss_growth(losses: list[float], growth: float, at: str, first: str, fix: str) -> None:
    """A finite model can still have diverged: stop when the last mean training loss (`at`: which
    round or central epoch) has grown more than `growth` (train.max_loss_growth) times over the
    first's (`first`: its name), or lies above LOSS_CAP, where a client's reply is rejected."""
    if losses[-1] > LOSS_CAP:
        raise FedUnlearnError(f"training diverged at {at}: mean training loss {losses[-1]:.3g} is over "
                              f"{LOSS_CAP:g}; lower {fix}")  # fmt: skip
    if growth > 0 and losses[-1] > growth * losses[0]:
        raise FedUnlearnError(f"training diverged at {at}: mean training loss {losses[-1]:.3g} is over "
                              f"{growth:g} x {first}'s ({losses[0]:.3g}); lower {fix}")  # fmt: skip


def sample_clients(seed: int, round_number: int, client_ids: list[str], fraction: float, least: int = 1) -> list[int]:
    """Positions of the clients taking part in a round. Each client joins with probability
    `fraction`, decided by a draw keyed by (seed, round, its id) alone, so removing other clients
    never changes whether it is chosen; if fewer than `least` are drawn, the clients with the lowest
    draws join up to that many (a secure sum needs two)."""
    if fraction >= 1:
        return list(range(len(client_ids)))
    draws = client_uniforms(seed, Stream.SAMPLING, round_number, client_ids)
    chosen = np.flatnonzero(draws < fraction)
    if len(chosen) < least:
        chosen = np.sort(np.argsort(draws, kind="stable")[:least])
    return [int(i) for i in chosen]


def evaluation_metrics(
    evaluations: list[ClientEvaluation], ks: list[int], full_ranking: bool, attackers: Collection[str] = ()
) -> dict[str, float]:
    """HR/NDCG over every evaluated user; ER@10 over the honest ones (not `attackers`: one who
    leaves at a later event trained the target as a positive, so its top 10 is the attack itself)."""
    metrics = ranking_metrics(np.array([e.rank for e in evaluations]), ks)
    metrics |= ranking_metrics(np.array([e.valid_rank for e in evaluations]), [10], prefix="valid_")
    if full_ranking:
        metrics |= ranking_metrics(np.array([e.full_rank for e in evaluations]), ks, prefix="full_")
    target_ranks = np.array([e.target_rank for e in evaluations if e.target_rank >= 0 and e.client_id not in attackers])
    if len(target_ranks):
        metrics["ER@10"] = hit_ratio(target_ranks, 10)  # exposure of the promoted item
    return metrics


def activity_metrics(evaluations: list[ClientEvaluation], activity: dict[str, int]) -> dict[str, float]:
    """HR@10 and NDCG@10 of the most and the least active fifth of the evaluated users (by training
    interactions; ties broken by client id), CURE4Rec's active / inactive split for the fairness of
    unlearning."""
    if len(evaluations) < 5:
        return {}
    order = sorted(evaluations, key=lambda e: (activity[e.client_id], e.client_id))
    fifth = len(order) // 5
    metrics: dict[str, float] = {}
    for name, group in (("inactive", order[:fifth]), ("active", order[-fifth:])):
        ranks = ranking_metrics(np.array([e.rank for e in group]), [10])
        metrics |= {f"{key}_{name}": value for key, value in ranks.items()}
    return metrics


def select_final(rows: list[dict[str, float]], select: str, unlearned_at: int = 0) -> dict[str, float]:
    """The reported row: the last evaluated round, or the one with the best validation HR@10
    (earliest on ties), so the test item never chooses the model it is judged on. With drop
    events only rounds from the last one on (`unlearned_at`) compete: an earlier round's model
    still held the clients that left, and was judged on them too."""
    if select == "last":
        return dict(rows[-1])
    after = [row for row in rows if row["round"] >= unlearned_at] or rows[-1:]
    return dict(max(after, key=lambda row: row["valid_HR@10"]))


class FederatedServer:
    """The server: samples clients among those still present, aggregates, evaluates, keeps the
    history when asked, and at each drop event runs the configured unlearning method."""

    def __init__(
        self,
        config: Config,
        federation: Federation,
        pool: ClientPool,
        progress: Progress,
        history: HistoryStore | None = None,
        schedule: dict[int, list[str]] | None = None,
        checkpoint: Checkpoint | None = None,
        plugins: ServerPlugins | None = None,
    ) -> None:
        self.config = config
        self.secure = config.defence.upload == SECURE_UPLOAD  # the server receives only sums of uploads
        self.plugins = plugins or ServerPlugins()
        client_ids, n_items = federation.client_ids, federation.n_items
        self.client_ids = client_ids
        self.position = {client_id: index for index, client_id in enumerate(client_ids)}
        self.pool = pool
        self.progress = progress
        self.history = history
        self.schedule = schedule or {}
        self.model: SplitModel = build_model(config.model, n_items)
        self.initial = self.model.init_shared(rng_for(config.run.training_seed(), Stream.SHARED_INIT))
        self.shared = self.initial
        shapes = {key: self.initial[key].shape for key in self.model.row_keys}
        self.row_optimizer = row_optimizer(config.train.server_optimizer, config.train.server_optimizer_lr, shapes)
        self.active = federation.kept(config.data.exclude_clients)  # positions of the clients still in it
        self.client_epochs = 0.0
        self.ldp_uploads: Counter[str] = Counter()  # noised uploads sent, per client: their epsilons compose
        self.ldp_uploads_forgotten = 0  # the most any removed client sent (its id is deleted with it)
        self.evaluated = 0  # users scored by the last evaluation
        self.optimizer_steps = 0  # every client's minibatch steps, summed
        self.events: list[dict[str, Any]] = []
        self.origin = initial_key(config)  # how the initial parameters the shared model grew from were drawn
        self.calibrations: list[tuple[int, ClientUpdate]] = []  # FedEraser's calibrated updates at the last event
        self.unlearned: Arrays = {}  # the shared parameters right after the last unlearning event
        self.limits = ReplyLimits.of(
            self.model, self.initial, client_ids, max_examples(federation, config),
            config.data.test_negatives, config.eval.full_ranking, config.unlearn.target_item >= 0,
            config.train.batch_size,
        )  # fmt: skip
        self.rejected = fresh_counts()
        self.losses: list[float] = []  # each round's mean training loss
        self.reported: Counter[str] = Counter()  # rejected uploads already shown in an earlier metrics row
        self.checkpoint = checkpoint
        self.data_fingerprint = federation.fingerprint if checkpoint is not None else ""
        self.handled = 0  # the round of the last drop event handled (0: none yet)
        # training interactions per client (the active / inactive split), without building each client's data
        self.activity = dict(zip(client_ids, np.diff(federation.split.train_indptr).tolist(), strict=True))

    def sample(self, round_number: int) -> list[int]:
        ids = [self.client_ids[i] for i in self.active]
        least = secure_quorum(self.config.defence.secagg_min_clients) if self.secure else 1
        chosen = sample_clients(self.config.run.training_seed(), round_number, ids, self.config.train.fraction, least)
        return [self.active[i] for i in chosen]

    def train_clients(
        self, round_number: int, clients: list[int], shared: Arrays, epochs: float | None = None, ascent: bool = False
    ) -> list[ClientUpdate]:
        """The clients train from `shared`; their replies are checked (rejected ones dropped and
        counted), optionally clipped (train.clip_norm_ratio), and sorted by client id, so every sum
        runs in the same order whatever order they arrived in. Every training call goes through here:
        rounds, and the unlearning methods' calibration, replay and ascent."""
        train = self.config.train
        self.progress.start_call(len(clients), "training" if not ascent else "ascending", round_number)
        releases = [self.ldp_uploads[self.client_ids[index]] for index in clients]
        replies = self.pool.train(round_number, clients, shared, self.progress.client_done, epochs, ascent, releases)
        self._count_ldp_uploads(replies)
        limits = replace(self.limits, epochs=train.local_epochs if epochs is None else epochs, ascent=ascent)
        updates, rejected, details = check_replies(replies, clients, limits, train.reject_norm_ratio)
        self._count("updates", rejected, len(updates), len(clients), f"round {round_number}", details)
        if train.clip_norm_ratio > 0:
            bound = {key: train.clip_norm_ratio * norm for key, norm in median_norms(updates).items()}
            updates = [rescale_tensors(update, bound, only_down=True) for update in updates]
        updates = sorted(updates, key=_by_client)
        self.client_epochs += sum(u.epochs for u in updates)
        self.optimizer_steps += sum(u.steps for u in updates)
        return updates

    def _count_ldp_uploads(self, replies: list[Reply[ClientUpdate]]) -> None:
        """Every upload a client sent under LDP spends privacy: a rejected one, a late one and one the
        server could not read too, and an ascent (a client that raised sent nothing). The count is
        also the client's next release index, so an upload it sent must never go uncounted."""
        if "ldp" not in self.config.defence.upload:
            return
        for reply in replies:
            client = self.client_ids[reply.sender]
            if reply.failure != FAILED and defends_upload(self.config, client):
                self.ldp_uploads[client] += 1

    def _count(self, kind: str, rejected: Counter[str], valid: int, asked: int, where: str, details: list[str]) -> None:
        """Add a call's rejected replies to the run's counts; too few valid replies stop the run."""
        self.rejected[kind] += rejected
        needed = min(self.config.train.min_replies, asked)
        if valid >= needed:
            return
        non_finite = rejected["nan"] + rejected["inf"] + rejected["loss"]
        cause = f"{where}: {valid} valid replies of {asked} ({reasons_text(rejected)} rejected), "
        cause += f"fewer than train.min_replies = {self.config.train.min_replies}"
        if non_finite and non_finite >= sum(rejected.values()) / 2:
            raise FedUnlearnError(f"training diverged at {cause}; lower train.lr or train.server_lr")
        hint = f"; first client error: {details[0]}" if details else "; see docs/ROBUSTNESS.md for each reason"
        raise FedUnlearnError(cause + hint)

    def _check_loss(self, round_number: int, loss: float) -> None:
        self.losses.append(loss)
        check_loss_growth(self.losses, self.config.train.max_loss_growth, f"round {round_number}", "round 1",
                          "train.lr or train.server_lr")  # fmt: skip

    def aggregate_delta(self, shared: Arrays, updates: list[ClientUpdate]) -> Arrays:
        """The server's step under train.aggregation (robust.py) and train.server_optimizer."""
        train = self.config.train
        delta = server_delta(
            self.model, shared, updates, self._row_lr(), train.aggregation, train.trim, train.dense_server_lr
        )
        if self.row_optimizer is None:
            return delta
        carried = np.zeros(self.model.n_items, dtype=bool)
        for update in updates:
            carried[update.item_ids] = True
        return self._adaptive_rows(delta, carried)

    def _row_lr(self) -> float:
        """The factor on the row tables' mean change: train.server_lr, or 1 when an adaptive server
        optimizer takes the plain mean as its pseudo-gradient."""
        return self.config.train.server_lr if self.row_optimizer is None else 1.0

    def _adaptive_rows(self, delta: Arrays, carried: np.ndarray) -> Arrays:
        """The row tables' mean change replaced by the adaptive server optimizer's step."""
        rows = {key: delta[key] for key in self.model.row_keys}
        return delta | self.row_optimizer.step(rows, carried)  # type: ignore[union-attr]

    def restart_server_optimizer(self) -> None:
        """Training starts again from the initial model (Retrain): so does the server optimizer's state."""
        if self.row_optimizer is not None:
            self.row_optimizer.reset()

    def aggregate(self, shared: Arrays, updates: list[ClientUpdate]) -> Arrays:
        return apply_delta(shared, self.aggregate_delta(shared, updates))

    def train_round(self, round_number: int, clients: list[int], shared: Arrays) -> tuple[Arrays, RoundSeen]:
        """One round from `shared`: the sampled clients train, the history records, the server aggregates."""
        if self.secure:
            return self._train_round_securely(round_number, clients, shared)
        updates = self.train_clients(round_number, clients, shared)
        if self.records_history():
            self.history.record_round(round_number, shared, updates)
        new_shared = self.aggregate(shared, updates)
        require_finite(new_shared, f"at round {round_number}")
        return new_shared, RoundSeen(float(np.mean([u.loss for u in updates])), updates)

    def _train_round_securely(self, round_number: int, clients: list[int], shared: Arrays) -> tuple[Arrays, RoundSeen]:
        """The round under secure aggregation: the server gets the sum of the clients' contributions
        (fl/secure_round.py) and who sent one; the history can keep only who took part."""
        train = self.config.train
        shapes = {key: tuple(value.shape) for key, value in shared.items()}
        most = int(self.limits.max_examples.max())
        layout = SecureLayout.of(self.model, shapes, most, self.config.defence.secagg_bound, train.local_epochs,
                                 train.batch_size)  # fmt: skip
        self.progress.start_call(len(clients), "training", round_number)
        contributors, failed, summed = self.pool.train_summed(
            round_number, clients, shared, self.progress.client_done, layout
        )
        rejected = Counter(reply.failure for reply in failed)
        details = [reply.detail for reply in failed if reply.detail]
        self._count("updates", rejected, len(contributors), len(clients), f"round {round_number}", details)
        require_secure_quorum(len(contributors), round_number, self.config.defence.secagg_min_clients)
        total = layout.total(summed, len(contributors))
        self.client_epochs += total.epochs
        self.optimizer_steps += round(total.steps)
        ids = [self.client_ids[index] for index in sorted(contributors)]
        if self.records_history():
            self.history.record_participation(round_number, ids)
        step = total.delta(shared, self._row_lr(), train.dense_server_lr)
        if self.row_optimizer is not None:
            step = self._adaptive_rows(step, total.row_weight > 1e-12)
        new_shared = apply_delta(shared, step)
        require_finite(new_shared, f"at round {round_number}")
        loss = total.loss / total.count
        touched, rows, dense = total.mean_change()
        return new_shared, RoundSeen(loss, [ClientUpdate(c, 0, touched, rows, dense, loss) for c in ids])

    @contextmanager
    def training_draws(self, seed: int) -> Iterator[None]:
        """Train with another training seed for a while, the initial parameters and the clients'
        fresh user parts drawn from it too, the server and its clients alike; the run's own draws
        come back after (Retrain under secure aggregation: unlearning/retrain.py). The model trained
        here replaces the run's, so `origin` names this draw from now on."""
        config, initial = self.config, self.initial
        self.config = self.pool.config = derive(config, {"run.train_seed": seed})
        self.initial = self.model.init_shared(rng_for(seed, Stream.SHARED_INIT))
        self.origin = initial_key(self.config)
        try:
            yield
        finally:
            self.config = self.pool.config = config
            self.initial = initial

    def records_history(self) -> bool:
        """Whether rounds trained now (or replayed by a method now) are stored: only while a drop event
        not yet handled can read them. No method reads a round at or after the last event, and a method
        handling the last event rewrites nothing (without a schedule the caller keeps every round)."""
        if self.history is None:
            return False
        return not self.schedule or any(event > self.handled for event in self.schedule)

    def roll_back_users(self) -> None:
        """A method rolls the shared model back to a stored checkpoint: with `unlearn.user_parts =
        "reset"` the retained clients' user parts restart from their initial draw, as Retrain's do
        (their trained ones learned against a model holding the leaving clients); "keep" leaves them
        (docs/ARCHITECTURE.md, user parts)."""
        if self.config.unlearn.user_parts == "reset":
            self.pool.forget(self.active)

    def upload_view(self, updates: list[ClientUpdate]) -> Arrays:
        """What a curious server keeps of each upload for the audit (plugins.read_uploads)."""
        if self.plugins.read_uploads is None:
            raise FedUnlearnError("audit.uploads needs the server built with the audit's upload reader")
        read = self.plugins.read_uploads
        return read(updates, self.position, len(self.client_ids), self.model.n_items, self.model.row_keys)

    def evaluate(self) -> dict[str, float]:
        self.progress.start_call(len(self.active), "evaluating")
        replies = self.pool.evaluate(self.active, self.shared, self.progress.client_done)
        evaluations, rejected, details = check_replies(replies, self.active, self.limits)
        self._count("evaluations", rejected, len(evaluations), len(self.active), "evaluation", details)
        if 2 * len(evaluations) < len(self.active):  # the metrics would describe a minority of the users
            raise FedUnlearnError(f"evaluation: {len(evaluations)} valid replies of {len(self.active)} "
                                  f"({reasons_text(rejected)} rejected): too few users to score the model")  # fmt: skip
        self.evaluated = len(evaluations)
        evaluations = sorted(evaluations, key=_by_client)
        eval_config, attackers = self.config.eval, set(self.config.unlearn.attackers)
        metrics = evaluation_metrics(evaluations, eval_config.ks, eval_config.full_ranking, attackers)
        metrics |= activity_metrics(evaluations, self.activity)
        if not evaluations or not all(np.isfinite(value) for value in metrics.values()):
            raise FedUnlearnError(f"evaluation gave no finite metrics ({len(evaluations)} valid replies)")
        return metrics

    def remove(self, round_number: int, leaving: list[str]) -> None:
        """Clients leave before `round_number`: unlearn them, then delete every trace of them, in the
        history too: their rows, or the whole history once no later event will read it."""
        self.unlearn(round_number, leaving)
        gone = set(leaving)
        self._forget_ldp_counts(gone)
        self.calibrations = [(r, update) for r, update in self.calibrations if update.client_id not in gone]
        if self.history is not None:
            if self.records_history():
                self.history.forget(leaving)
            else:
                self.history.clear()
                self.history.vacuum()

    def _forget_ldp_counts(self, clients: set[str]) -> None:
        """Their LDP counts leave with them; the largest stays, with no id, for the run's epsilon."""
        self.ldp_uploads_forgotten = max([self.ldp_uploads_forgotten, *(self.ldp_uploads.pop(c, 0) for c in clients)])

    def unlearn(self, round_number: int, leaving: list[str], method: str | None = None) -> None:
        """Unlearn the leaving clients with `method` (default: the configured one) and record the
        event; their state on the clients' side is deleted, the history is left to the caller."""
        method = method or self.config.unlearn.method
        if method not in self.plugins.methods:
            raise FedUnlearnError(f"unlearning method {method!r} was not given to the server (ServerPlugins.methods)")
        forgotten = [self.position[c] for c in leaving]
        self.active = [i for i in self.active if i not in set(forgotten)]
        self.handled = round_number
        history_bytes = self.history.bytes_by_kind() if self.history is not None else None
        started, epochs_before, steps_before = time.perf_counter(), self.client_epochs, self.optimizer_steps
        took_part = self.history is None or bool(set(leaving) & self.history.client_ids())
        if took_part:  # clients that never trained left nothing to erase: every method is a no-op
            with self.progress.during(f"drop before round {round_number}: {method}"):
                self.shared = self.plugins.methods[method](self, round_number, forgotten)
        require_finite(self.shared, f"in {method} unlearning before round {round_number}")
        seconds, client_epochs = time.perf_counter() - started, self.client_epochs - epochs_before
        membership = self._membership(forgotten)  # before their state is deleted
        self.pool.forget(forgotten)
        self.events.append(
            {
                "round": round_number,
                "clients": leaving,
                "method": method,
                "initial": self.origin,  # the start the cosine to Retrain is taken from (comparison.py)
                "seconds": seconds,
                "client_epochs": client_epochs,
                "optimizer_steps": self.optimizer_steps - steps_before,
                "history_bytes": history_bytes,  # what the server kept to serve this request
                "after": self.evaluate(),  # retained users, on the model right after unlearning
                "MIA_AUC": float(np.mean([membership[client] for client in sorted(membership)])),  # any arrival order
            }
        )
        self.unlearned = {key: value.copy() for key, value in self.shared.items()}

    def _membership(self, forgotten: list[int]) -> dict[str, float]:
        """The leaving clients' membership AUCs; a reply from another client, or an AUC outside
        [0, 1], is dropped and counted."""
        leaving = {self.client_ids[i] for i in forgotten}
        replies = self.pool.membership(forgotten, self.shared)
        valid = {c: auc for c, auc in replies.items() if c in leaving and np.isfinite(auc) and 0 <= auc <= 1}
        self.rejected["membership"] += Counter({"auc_range": len(replies) - len(valid)})
        if not valid:
            raise FedUnlearnError(f"no leaving client returned a valid membership AUC ({len(replies)} replies)")
        return valid

    def compare_methods(self, round_number: int, leaving: list[str]) -> list[dict[str, Any]]:
        """Every unlearning method tried on a copy of this server at this event (client state and
        history copied), with speedup and distance to Retrain: one block of the unlearning table.
        At a later event the copies start from the run's state, i.e. after the configured method
        handled the earlier events; Retrain's row retrains without every client removed so far."""
        if self.history is None:
            raise FedUnlearnError("unlearn.compare needs a drop schedule (unlearn.drop or unlearn.drop_random)")
        rows, unlearned = [], []
        removed_so_far = sum(len(event["clients"]) for event in self.events)
        for method in self.plugins.methods:
            twin = copy.copy(self)
            twin.pool = self.pool.fork()
            twin.handled = round_number
            copied = twin.records_history()  # only a later event's reader makes a method write the history
            if copied:
                twin.history = self.history.copy_in_memory()
            twin.active, twin.events, twin.calibrations = list(self.active), [], []
            twin.rejected = fresh_counts()  # a trial's rejections and noised uploads are not the run's
            twin.ldp_uploads = Counter(self.ldp_uploads)
            twin.checkpoint = None
            twin.progress = self.progress  # each trial shows as its own phase
            twin.unlearn(round_number, leaving, method)
            if copied:
                twin.history.close()
            twin.pool.release()
            event = twin.events[-1]
            rows.append(
                {"event": round_number, "removed": removed_so_far + len(leaving), "method": method}
                | {"model": self.config.model.name, "seed": self.config.run.seed}
                | {"initial": event["initial"]}
                | {k: v for k, v in event["after"].items() if k in COMPARED}
                | {"MIA_AUC": event["MIA_AUC"], "unlearn_seconds": event["seconds"]}
                | {"client_epochs": event["client_epochs"], "optimizer_steps": event["optimizer_steps"]}
            )
            unlearned.append(twin.unlearned)
        compare_with_retrain(rows, unlearned, {initial_key(self.config): self.initial})
        return rows

    def _transaction(self) -> AbstractContextManager[Any]:
        """One round (with the drop event before it) is stored whole or not at all: the history's
        transaction, which the checkpoint shares (checkpoint.py)."""
        store = self.history if self.history is not None else self.checkpoint
        return store.transaction() if store is not None else nullcontext()

    def _save(self, result: FederationResult, round_number: int, elapsed: float) -> None:
        arrays = prefixed("shared", self.shared) | prefixed("unlearned", self.unlearned)
        arrays |= prefixed("pool", self.pool.state())  # type: ignore[attr-defined]
        if self.row_optimizer is not None:
            arrays |= prefixed("server_optimizer", self.row_optimizer.state())
        if result.uploads is not None:
            arrays |= prefixed("uploads", result.uploads)
        meta = {
            "round": round_number, "elapsed": elapsed, "active": self.active, "client_epochs": self.client_epochs,
            "optimizer_steps": self.optimizer_steps, "ldp_uploads": dict(self.ldp_uploads),
            "ldp_uploads_forgotten": self.ldp_uploads_forgotten,
            "events": self.events, "losses": self.losses, "reported": self.reported,
            "rejected": {kind: dict(counts) for kind, counts in self.rejected.items()},
            "rows": result.rounds, "round_ends": result.round_ends, "comparison": result.comparison,
            "round_clients": result.round_clients,
            "config": self.config.to_dict(), "data": self.data_fingerprint,  # what it may resume with
        }  # fmt: skip
        self.checkpoint.save(arrays, meta)  # type: ignore[union-attr]

    def _check_same_run(self, meta: dict[str, Any]) -> None:
        """A checkpoint continues only the run that wrote it: the same settings on the same data."""
        again = "resume with the settings and data it started with, or start again with another --out"
        if "config" not in meta:
            raise FedUnlearnError(f"the checkpoint was written by an older fedunlearn and cannot be checked: {again}")
        before, now = meta["config"], self.config.to_dict()
        changed = [f"{s}.{k}: {before.get(s, {}).get(k)!r} -> {now.get(s, {}).get(k)!r}"
                   for s, k in differing_keys(before, now)]  # fmt: skip
        if changed:
            raise FedUnlearnError(f"the checkpoint was written with other settings ({'; '.join(changed[:3])}): {again}")
        if meta["data"] != self.data_fingerprint:
            raise FedUnlearnError(f"the data changed since the checkpoint (its users, items or split differ): {again}")

    def _restore(self, result: FederationResult) -> tuple[int, float]:
        """Continue from the checkpoint, if a round completed: (the next round, seconds already run)."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is None:
            return 1, 0.0
        arrays, meta = saved
        self._check_same_run(meta)
        self.shared, self.unlearned = unprefixed("shared", arrays), unprefixed("unlearned", arrays)
        self.pool.load_state(unprefixed("pool", arrays))  # type: ignore[attr-defined]
        if self.row_optimizer is not None:
            self.row_optimizer.load_state(unprefixed("server_optimizer", arrays))
        result.uploads = unprefixed("uploads", arrays) or None
        self.active, self.client_epochs, self.events = meta["active"], meta["client_epochs"], meta["events"]
        self.optimizer_steps = meta["optimizer_steps"]
        self.ldp_uploads = Counter(meta.get("ldp_uploads", {}))  # absent from checkpoints written before it
        self.ldp_uploads_forgotten = meta.get("ldp_uploads_forgotten", 0)
        self._forget_ldp_counts({c for event in self.events for c in event["clients"]})  # a checkpoint before it
        self.handled = max((event["round"] for event in self.events), default=0)
        self.origin = next((e["initial"] for e in reversed(self.events) if "initial" in e), self.origin)
        self.losses, self.reported = meta["losses"], Counter(meta["reported"])
        self.rejected = fresh_counts() | {kind: Counter(counts) for kind, counts in meta["rejected"].items()}
        result.rounds, result.round_ends, result.comparison = meta["rows"], meta["round_ends"], meta["comparison"]
        result.round_clients = meta.get("round_clients", [])  # absent from checkpoints written before it
        self.progress.end_round(meta["round"])
        return meta["round"] + 1, meta["elapsed"]

    def run(self) -> FederationResult:
        result = FederationResult()
        rounds = self.config.train.rounds
        first, elapsed = self._restore(result)
        started, result.earlier_seconds = time.perf_counter() - elapsed, elapsed
        for round_number in range(first, rounds + 1):
            with self._transaction():
                self._run_round(result, round_number, started)
                if self.checkpoint is not None:
                    self._save(result, round_number, time.perf_counter() - started)
            self.progress.end_round()
        reasons = sorted({key for row in result.rounds for key in row if key.startswith("rejected_")})
        for row in result.rounds:  # the same columns in every row
            row |= {key: row.get(key, 0) for key in reasons}
        last_event = max((event["round"] for event in self.events), default=0)
        result.final = select_final(result.rounds, self.config.eval.select, last_event)
        result.rejected = {kind: dict(sorted(counts.items())) for kind, counts in self.rejected.items()}
        result.ldp_uploads = max([self.ldp_uploads_forgotten, *self.ldp_uploads.values()])
        result.shared = self.shared
        result.losses = list(self.losses)
        result.events = self.events
        result.unlearned = self.unlearned
        return result

    def _run_round(self, result: FederationResult, round_number: int, started: float) -> None:
        """The drop event before the round (if any), the round, and its evaluation row."""
        rounds = self.config.train.rounds
        if round_number in self.schedule:
            if self.config.unlearn.compare:
                result.comparison += self.compare_methods(round_number, self.schedule[round_number])
            self.remove(round_number, self.schedule[round_number])
        clients = self.sample(round_number)
        self.progress.start_round(round_number)
        self.shared, seen = self.train_round(round_number, clients, self.shared)
        self._check_loss(round_number, seen.loss)
        if round_number == rounds and audits_privacy(self.config) and self.config.audit.uploads:  # the audit's view
            result.uploads = self.upload_view(seen.uploads)
        if round_number % self.config.eval.every == 0 or round_number == rounds:
            since = self.rejected["updates"] - self.reported  # rejected in the rounds since the last row
            self.reported = Counter(self.rejected["updates"])
            metrics = self.evaluate()
            row = {
                "round": round_number,
                "clients": len(clients),
                "evaluated": self.evaluated,  # users whose evaluation replies passed the checks
                "train_loss": self.losses[-1],
                **metrics,
                "rejected": sum(since.values()),
                **{f"rejected_{reason}": count for reason, count in sorted(since.items())},
                "seconds": time.perf_counter() - started,
            }
            result.rounds.append(row)
            self.progress.evaluated(row)
        result.round_ends.append(time.time())
        result.round_clients.append(len(clients))
