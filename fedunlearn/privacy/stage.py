"""After training: audit attribute privacy, run the configured defence on the clients, audit again.

The table has one row per defence (`none`, or the upload defence the model was trained with, for
the model as trained; then each post-training defence) x view (embedding, upload) x attacker x
attribute x audit (global, local), with the recommendation quality (HR@10, NDCG@10) of that model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from fedunlearn.config import Config, DefenceConfig, derive
from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.federation import Federation
from fedunlearn.models.base import Arrays, SplitModel
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.attrcloak import DataRetention, PseudoClasses, attrcloak
from fedunlearn.privacy.audit import (
    attribute_labels,
    audited_attributes,
    own_class,
    privacy_table,
    say_values_left_out,
)
from fedunlearn.privacy.baselines import regularised_defence
from fedunlearn.privacy.cells import outside, summable_population
from fedunlearn.privacy.common import (
    LEFT_OUT,
    Aggregator,
    AttributeClasses,
    DefenceOutcome,
    StepDone,
    flatten_users,
    moving,
    no_progress,
    unflatten_users,
)
from fedunlearn.privacy.registry import DEFENCES
from fedunlearn.privacy.upload_attack import RecoveryScore, recovery_score
from fedunlearn.progress import Progress

Evaluate = Callable[[list[Arrays]], dict[str, float]]  # users -> HR@10, NDCG@10, ... on the retained clients
# (config naming the method, defending mask, the audit's embedding attackers, called after each
# step) -> the outcome, with the defended embeddings (n, D)
Defend = Callable[[Config, np.ndarray, list[Attacker], StepDone], DefenceOutcome]


@dataclass
class PrivacyReport:
    table: pd.DataFrame
    client_ids: list[str]  # the audited clients, in row order of the arrays below
    attributes: pd.DataFrame  # their attributes (row i: client_ids[i])
    users_before: np.ndarray  # (n, D) flattened user parts, for the plots
    users_after: np.ndarray | None
    defence_seconds: float = 0.0
    defence_steps: int = 0  # the configured defence's steps taken
    defending: int = 0  # clients that ran the defence
    retention_share: float = float("nan")  # the configured defence's (mean_retention_share)
    upload_recovery: RecoveryScore | None = None  # the upload-structure attack's reading of the interactions
    left_out: int = 0  # clients a defence's sums leave out (they hold a value under three share: privacy/cells.py)
    undefended: list[str] = field(default_factory=list)  # attributes with fewer than two such classes


def attribute_classes(attributes: pd.DataFrame, names: list[str]) -> list[AttributeClasses]:
    out = []
    for name in names:
        classes, labels = np.unique(attribute_labels(attributes, name), return_inverse=True)
        out.append(AttributeClasses(name, labels, len(classes)))
    return out


def defence_classes(attributes: pd.DataFrame, names: list[str]) -> list[AttributeClasses]:
    """The attributes as a defence's secure sums hold them (`cells.summable_population`, counted
    here as the Flower path learns the counts from secure sums): the holders of a value under
    MIN_CELL_CLIENTS are LEFT_OUT of every attribute; an attribute with fewer than two classes left
    is not defended."""
    rows = {name: attribute_labels(attributes, name) for name in names}
    values = {name: sorted(set(rows[name])) for name in names}

    def count(defended: list[str], left_out: dict[str, list[str]]) -> dict[str, np.ndarray]:
        inside = ~outside(rows, left_out)
        return {name: np.array([np.sum(inside & (rows[name] == value)) for value in values[name]]) for name in defended}

    population = summable_population(values, count, len(attributes))
    out = outside(rows, population.left_out)
    return [
        AttributeClasses(name, np.array([LEFT_OUT if gone else kept.index(value)
                                         for value, gone in zip(rows[name], out, strict=True)]), len(kept))
        for name, kept in population.classes.items()
    ]  # fmt: skip


def at_risk(attackers: list[Attacker], features: np.ndarray, attributes: pd.DataFrame, threshold: float) -> np.ndarray:
    """Whether each client (row) is at risk: some attacker is at least `threshold` confident in its
    true value (none is in a value it was not trained on: it never guesses it). A client decides
    this alone, on its device, from the attackers shipped to it."""
    risky = np.zeros(len(features), dtype=bool)
    for attacker in attackers:
        column = own_class(attacker.classes, attribute_labels(attributes, attacker.attribute))
        proba = attacker.proba(features)
        own = np.where(column >= 0, proba[np.arange(len(column)), np.maximum(column, 0)], 0.0)
        risky |= own >= threshold
    return risky


def defending_clients(
    config: Config, client_ids: list[str], features: np.ndarray, attributes: pd.DataFrame, attackers: list[Attacker]
) -> np.ndarray:
    """all / listed / at-risk (`at_risk` with the audit's embedding `attackers`)."""
    defence = config.defence
    if defence.clients == "all":
        return np.ones(len(client_ids), dtype=bool)
    if defence.clients == "listed":
        unknown = sorted(set(defence.client_ids) - set(client_ids))
        if unknown:
            raise FedUnlearnError(f"defence.client_ids names unknown clients {unknown[:5]}: use the dataset's user ids")
        return np.isin(client_ids, defence.client_ids)
    return at_risk(attackers, features, attributes, defence.risk_threshold)


@dataclass
class CloakSettings:
    """AttrCloak's variant (dd / df), fixed weight on the attribute loss (None: the min-norm weight
    at every step), whether it stops at the null level, and whether its covariance term stops when
    the covariances' halves disagree (`defence.cloak_stop` "null"; "null-means" leaves it on), and
    how the min-norm weight balances the two gradients (`defence.cloak_balance`)."""

    variant: str
    fixed_weight: float | None
    stop_at_null: bool
    brake_covariance: bool
    unit_balance: bool = False  # defence.cloak_balance = "unit": the min-norm weight of unit-length gradients


def cloak_settings(defence: DefenceConfig) -> CloakSettings:
    """`defence.cloak_weight` >= 0 fixes the weight; the default (-1) is the min-norm weight, except
    for DF stopping at the null level, which takes 1: DF's min-norm weight lets e - e_original cancel
    the attribute gradient within a few steps, so it stalls near its start (docs/PRIVACY.md), and the
    null level is then its brake."""
    variant, stop_at_null = DEFENCES[defence.method].variant, defence.cloak_stop != "steps"
    brake, unit = defence.cloak_stop == "null", defence.cloak_balance == "unit"
    if defence.cloak_weight >= 0:
        return CloakSettings(variant, defence.cloak_weight, stop_at_null, brake, unit)
    return CloakSettings(variant, 1.0 if variant == "df" and stop_at_null else None, stop_at_null, brake, unit)


def run_defence(
    config: Config,
    model: SplitModel,
    positives: list[np.ndarray],
    client_ids: list[str],
    shared: Arrays,
    embeddings: np.ndarray,
    attributes: list[AttributeClasses],
    defending: np.ndarray,
    aggregator: Aggregator | None,
    step_done: StepDone = no_progress,
) -> DefenceOutcome:
    """The post-training defence of `config.defence.method` over these clients (rows of `embeddings`,
    `positives` and `client_ids` follow each other)."""
    defence = config.defence
    if DEFENCES[defence.method].loop == "attrcloak":
        settings = cloak_settings(defence)
        retention = None
        if settings.variant == "dd":
            retention = DataRetention(model, shared, positives, client_ids, config.model.loss,
                                      config.model.negatives, config.run.seed, defence.batch)  # fmt: skip
        null = PseudoClasses(config.defence_seed(), client_ids) if settings.stop_at_null else None
        return attrcloak(
            embeddings, attributes, settings.variant, defence.steps, defence.lr, defending, retention, aggregator,
            settings.fixed_weight, null, settings.brake_covariance, settings.unit_balance, step_done,
        )  # fmt: skip
    return regularised_defence(
        embeddings, attributes, defence.method, defence.steps, defence.lr, defence.weight, defending,
        config.run.seed, aggregator, step_done,
    )  # fmt: skip


def upload_profiles(model: SplitModel, shared: Arrays, norms: np.ndarray) -> np.ndarray:
    """The curious server's compact reading of each upload: the item rows it touched, averaged with
    the size of their change as weight ((clients, items) norms -> (clients, D)); zero if none."""
    table = np.concatenate([shared[key] for key in model.row_keys], axis=1).astype(np.float64)
    weights = norms / np.maximum(norms.sum(1, keepdims=True), 1e-12)
    return weights @ table


POST_TRAINING = tuple(DEFENCES)


def mean_retention_share(method: str, outcome: DefenceOutcome) -> float:
    """An AttrCloak defence's mean `attrcloak.retention_share` over its steps (how much of each
    step was its retention loss's); NaN for the regularised defences (a fixed setting)."""
    if DEFENCES[method].loop != "attrcloak" or not outcome.retention_shares:
        return float("nan")
    return float(np.mean(outcome.retention_shares))


def one_blas_thread() -> threadpool_limits:
    """numpy's BLAS on one thread while a defence runs. A defence alternates numpy's BLAS (OpenBLAS
    threads) and torch (its OpenMP threads) on small matrices (128 x 128 covariances); on a 2-core
    machine each pool's waiting threads spin on the cores the other needs. AttrCloak-DF on ML-100K
    NCF after DD: 8.8 s -> 1.8 s, the same numbers (docs/RESULTS.md, 2026-12-06)."""
    return threadpool_limits(limits=1, user_api="blas")


def privacy_stage(
    config: Config,
    model: SplitModel,
    federation: Federation,
    clients: list[int],
    shared: Arrays,
    users: list[Arrays],
    uploads: Arrays | None,
    evaluate: Evaluate,
    aggregator: Aggregator | None = None,
    defend: Defend | None = None,
    progress: Progress | None = None,
) -> tuple[PrivacyReport, list[Arrays]]:
    """Audit, then for the configured post-training defence (or, with `defence.compare`, for each
    of them, every one from the trained users, the configured one last) defend and audit again,
    over `clients` (federation indices; `users` and `uploads` rows follow them). Returns the report
    and the users after the configured defence.

    `defend` runs one defence; by default `run_defence` over `users` (in-process and batched
    engines); the Flower engine passes one that runs it on the clients (server/audit.py). `progress`
    shows each stage (the audit, each defence) as a phase of the run's bar."""
    progress = progress or Progress(0, enabled=False)
    attributes = federation.dataset.attributes.iloc[clients].reset_index(drop=True)
    names = audited_attributes(config.audit, attributes)
    before = flatten_users(model, users)
    views = {"embedding": before}
    covered: dict[str, np.ndarray] = {}
    recovery = None
    if uploads is not None and config.audit.uploads:
        if config.model.negatives < 2:  # one negative per positive: the sides are about the same size
            print("audit: the upload-structure attack takes the smaller side of an upload for the positives, which "
                  "needs model.negatives >= 2; with 1 it may swap them (its precision, recall and cosine then read "
                  "low: a bound of this attacker, not of what the upload gives away)", file=sys.stderr)  # fmt: skip
        views["upload"] = upload_profiles(model, shared, uploads["norms"])
        views["upload-direction"] = uploads["directions"]
        views["upload-items"] = uploads["recovered"].astype(np.float32)  # the sign split's items, one-hot
        covered = dict.fromkeys(("upload", "upload-direction", "upload-items"), uploads["uploaded"])
        positives = [federation.split.train_of(i) for i in clients]
        recovery = recovery_score(uploads, positives, before)
    say_values_left_out(config.audit, attributes)
    with progress.during("privacy: audit of the trained model"):
        table, audited = privacy_table(views, attributes, config, aggregator, covered)
    table.insert(0, "defence", config.defence.upload if config.defence.upload != "none" else "none")
    for key, value in evaluate(users).items():
        table[key] = value
    client_ids = [federation.client_ids[i] for i in clients]
    report = PrivacyReport(table, client_ids, attributes, before, None, upload_recovery=recovery)
    methods = POST_TRAINING if config.defence.compare else [config.defence.method]
    methods = [method for method in methods if method != "none"]
    if not methods:
        return report, users
    attackers = [item.attacker for item in audited if item.view == "embedding"]
    defending = defending_clients(config, client_ids, before, attributes, attackers)
    classes = defence_classes(attributes, names)
    report.left_out = int((classes[0].labels == LEFT_OUT).sum()) if classes else 0
    defending = moving(defending, classes)
    report.undefended = [name for name in names if name not in {attribute.name for attribute in classes}]
    positives = [federation.split.train_of(i) for i in clients]

    def central(trial: Config, mask: np.ndarray, _attackers: list[Attacker], step_done: StepDone) -> DefenceOutcome:
        return run_defence(trial, model, positives, client_ids, shared, before, classes, mask, aggregator, step_done)

    tables: dict[str, pd.DataFrame] = {}
    kept = users
    # the configured defence last: on Flower the clients then end up holding its embeddings
    for method in sorted(methods, key=lambda name: name == config.defence.method):
        trial = derive(config, {"defence.method": method})
        with progress.during(f"privacy: {method} on {int(defending.sum())} clients, then its audit"):
            with one_blas_thread():
                outcome = (defend or central)(trial, defending, attackers, progress.start_steps(trial.defence.steps))
            assert outcome.embeddings is not None, "a Defend returns the defended embeddings"
            if not np.all(np.isfinite(outcome.embeddings)):
                raise FedUnlearnError(f"{method} left non-finite user embeddings (NaN or inf): lower defence.lr")
            users_after = unflatten_users(users, outcome.embeddings)
            after, _ = privacy_table({"embedding": outcome.embeddings}, attributes, config, aggregator)
            after.insert(0, "defence", method)
            for key, value in evaluate(users_after).items():
                after[key] = value
        after["seconds"] = outcome.seconds
        after["steps"] = len(outcome.losses)
        share = mean_retention_share(method, outcome)
        after["retention_share"] = share
        tables[method] = after
        if method == config.defence.method:
            kept = users_after
            report.users_after = outcome.embeddings
            report.defence_seconds, report.retention_share = outcome.seconds, share
            report.defence_steps = len(outcome.losses)
    report.table = pd.concat([table, *(tables[method] for method in methods)], ignore_index=True)
    report.defending = int(defending.sum())
    return report, kept
