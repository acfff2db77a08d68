"""After training: audit attribute privacy, run the configured defence on the clients, audit again.

The table has one row per stage (before / after the defence) x view (embedding, upload) x
attacker x attribute x audit (global, local), with the recommendation quality of that stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedunlearn.audit import AuditedAttack, privacy_table
from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.federation import Federation
from fedunlearn.models import Arrays, SplitModel
from fedunlearn.privacy.attrcloak import (
    Aggregator,
    AttributeClasses,
    DataRetention,
    DefenceOutcome,
    attrcloak,
    flatten_users,
    unflatten_users,
)
from fedunlearn.privacy.baselines import regularised_defence

Evaluate = Callable[[list[Arrays]], dict[str, float]]  # users -> HR@10, NDCG@10, ... on the retained clients


@dataclass
class PrivacyReport:
    table: pd.DataFrame
    users_before: np.ndarray  # (n, D) flattened user parts, for the plots
    users_after: np.ndarray | None
    defence_seconds: float = 0.0
    defending: int = 0  # clients that ran the defence
    weights: list[float] = field(default_factory=list)  # AttrCloak's min-norm weight per step


def attribute_classes(attributes: pd.DataFrame, names: list[str]) -> list[AttributeClasses]:
    out = []
    for name in names:
        classes, labels = np.unique(attributes[name].to_numpy().astype(str), return_inverse=True)
        out.append(AttributeClasses(name, labels, len(classes)))
    return out


def audited_attributes(config: Config, attributes: pd.DataFrame) -> list[str]:
    names = config.audit.attributes or list(attributes.columns)
    missing = sorted(set(names) - set(attributes.columns))
    if missing or not names:
        raise FedUnlearnError(
            f"audit.attributes {missing or names} not in the dataset, which has {list(attributes.columns)}: "
            "set audit.attributes to some of those"
        )
    return names


def defending_clients(
    config: Config, client_ids: list[str], features: np.ndarray, attributes: pd.DataFrame, audited: list[AuditedAttack]
) -> np.ndarray:
    """all / listed / at-risk: a client defends when, for some attribute, an attacker shipped to it
    is at least `risk_threshold` confident in its true value (it decides alone, on its device)."""
    defence = config.defence
    if defence.clients == "all":
        return np.ones(len(client_ids), dtype=bool)
    if defence.clients == "listed":
        unknown = sorted(set(defence.client_ids) - set(client_ids))
        if unknown:
            raise FedUnlearnError(f"defence.client_ids names unknown clients {unknown[:5]}: use the dataset's user ids")
        return np.isin(client_ids, defence.client_ids)
    risky = np.zeros(len(client_ids), dtype=bool)
    for item in audited:
        if item.view != "embedding":
            continue
        labels = attributes[item.attacker.attribute].to_numpy().astype(str)
        proba = item.attacker.proba(features)
        own = proba[np.arange(len(labels)), np.searchsorted(item.attacker.classes, labels)]
        risky |= own >= defence.risk_threshold
    return risky


def run_defence(
    config: Config,
    model: SplitModel,
    positives: list[np.ndarray],
    shared: Arrays,
    embeddings: np.ndarray,
    attributes: list[AttributeClasses],
    defending: np.ndarray,
    aggregator: Aggregator | None,
) -> DefenceOutcome:
    defence = config.defence
    if defence.method.startswith("attrcloak"):
        variant = defence.method.removeprefix("attrcloak-")
        retention = None
        if variant == "dd":
            retention = DataRetention(model, shared, positives, config.model.loss, config.model.negatives,
                                      config.run.seed)  # fmt: skip
        fixed = None if defence.cloak_weight < 0 else defence.cloak_weight
        return attrcloak(
            embeddings, attributes, variant, defence.steps, defence.lr, defending, retention, aggregator, fixed
        )
    return regularised_defence(
        embeddings, attributes, defence.method, defence.steps, defence.lr, defence.weight, defending,
        config.run.seed, aggregator,
    )  # fmt: skip


def privacy_stage(
    config: Config,
    model: SplitModel,
    federation: Federation,
    clients: list[int],
    shared: Arrays,
    users: list[Arrays],
    uploads: np.ndarray | None,
    evaluate: Evaluate,
    aggregator: Aggregator | None = None,
) -> tuple[PrivacyReport, list[Arrays]]:
    """Audit, defend (if configured), audit again, over `clients` (federation indices; `users` and
    `uploads` rows follow them); returns the report and those clients' users afterwards."""
    attributes = federation.dataset.attributes.iloc[clients].reset_index(drop=True)
    names = audited_attributes(config, attributes)
    before = flatten_users(model, users)
    uploads = None if uploads is None or not config.audit.uploads else uploads
    views = {"embedding": before} | ({"upload": uploads} if uploads is not None else {})
    table, audited = privacy_table(views, attributes, config, aggregator)
    table.insert(0, "stage", "before")
    for key, value in evaluate(users).items():
        table[key] = value
    report = PrivacyReport(table, before, None)
    if config.defence.method == "none":
        return report, users
    client_ids = [federation.client_ids[i] for i in clients]
    defending = defending_clients(config, client_ids, before, attributes, audited)
    classes = attribute_classes(attributes, names)
    positives = [federation.split.train_of(i) for i in clients]
    outcome = run_defence(config, model, positives, shared, before, classes, defending, aggregator)
    users_after = unflatten_users(users, outcome.embeddings)
    after, _ = privacy_table({"embedding": outcome.embeddings}, attributes, config, aggregator)
    after.insert(0, "stage", "after")
    for key, value in evaluate(users_after).items():
        after[key] = value
    after["seconds"] = outcome.seconds
    report.table = pd.concat([table, after], ignore_index=True)
    report.users_after = outcome.embeddings
    report.defence_seconds, report.defending, report.weights = outcome.seconds, int(defending.sum()), outcome.weights
    return report, users_after
