"""Audits: unlearning against Retrain, and attribute privacy in the global and the local view.

Global view: what a central party could infer, from every user embedding (a model release or a
curious server with access) and every upload. Local view: each client runs the attacker shipped to
it on its own embedding and upload; only sums of outcomes leave the clients (correct guesses per
class, a histogram of the attacker's confidence in the true class), through the aggregator.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedunlearn.config import RISK_TENTHS, AuditConfig, Config
from fedunlearn.data.dataset import UNKNOWN
from fedunlearn.errors import FedUnlearnError
from fedunlearn.privacy.attacks import Attacker, attack_metrics, decide, shadow_split, train_attacker
from fedunlearn.privacy.common import Aggregator, PlainSum

CONFIDENCE_BINS = RISK_TENTHS  # defence.risk_threshold is a multiple of 1 / CONFIDENCE_BINS (config)


@dataclass
class AuditedAttack:
    """One attacker on one attribute and one view, with the users it was tested on."""

    view: str  # embedding | upload
    attacker: Attacker
    test: np.ndarray  # user indices not in the shadow set
    metrics: dict[str, float]


def audited_attributes(audit: AuditConfig, attributes: pd.DataFrame) -> list[str]:
    """audit.attributes, or every attribute the dataset has; an unknown name is an error."""
    if attributes.columns.empty:
        raise FedUnlearnError(
            "the audit and the defences need user attributes, and the dataset has none (a CSV without "
            "data.users_path): give a users file, or leave audit and defence off"
        )
    names = audit.attributes or list(attributes.columns)
    missing = sorted(set(names) - set(attributes.columns))
    if missing or not names:
        raise FedUnlearnError(
            f"audit.attributes {missing or names} not in the dataset, which has {list(attributes.columns)}: "
            "set audit.attributes to some of those"
        )
    return names


def attribute_labels(attributes: pd.DataFrame, name: str) -> np.ndarray:
    return attributes[name].to_numpy().astype(str)


def say_values_left_out(audit: AuditConfig, attributes: pd.DataFrame) -> None:
    """Name each attribute's values that a single client holds: the attack leaves them out (a class
    needs a shadow and a test client; global_audit), which went unsaid (a review: 397 / 2 / 1 read
    as a two-class attribute). Once per audit, before its first attack."""
    for attribute in audited_attributes(audit, attributes):
        labels = attribute_labels(attributes, attribute)
        values, counts = np.unique(labels[labels != UNKNOWN], return_counts=True)
        lone = values[counts < 2]
        if len(lone) and (counts >= 2).sum() >= 2:  # with fewer, the attribute is not attacked at all (said there)
            named = ", ".join(map(repr, lone[:3].tolist())) + (", ..." if len(lone) > 3 else "")
            print(f"audit: {attribute}: {len(lone)} value(s) held by a single client left out of the attack "
                  f"({named}): a class needs a shadow and a test client", file=sys.stderr)  # fmt: skip


def own_class(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label's column in an attacker's `classes`, -1 for a value the attacker was not trained
    on (a class the audit left out, or UNKNOWN): searchsorted alone would give a neighbour's column."""
    at = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
    return np.where(classes[at] == labels, at, -1)


def global_audit(
    views: dict[str, np.ndarray],
    attributes: pd.DataFrame,
    audit: AuditConfig,
    seed: int,
    covered: dict[str, np.ndarray] | None = None,
) -> list[AuditedAttack]:
    """Train every attacker on a stratified shadow set of each attribute and test it on the rest,
    for each view (name -> (n_users, features)). `covered` (view -> mask over users) limits a view to
    the users it holds (the uploads: only the last round's participants; an absent user's zero row
    would dilute the attack towards chance). Users whose value is UNKNOWN are not attacked: "the
    source says nothing" is no class of the attribute."""
    covered = covered or {}
    for view, features in views.items():
        if not np.all(np.isfinite(features)):
            raise FedUnlearnError(f"the audit's {view} view holds NaN or inf: no attacker can be scored on it")
    out = []
    for attribute in audited_attributes(audit, attributes):
        labels = attribute_labels(attributes, attribute)
        for view, features in views.items():
            rows = np.flatnonzero(covered.get(view, np.ones(len(labels), dtype=bool)) & (labels != UNKNOWN))
            values, counts = np.unique(labels[rows], return_counts=True)
            if (counts >= 2).sum() < 2:  # nothing to tell apart: every classifier would see one class
                print(f"audit: {attribute} not attacked in the {view} view: fewer than two of its values have 2 of "
                      f"the {len(rows)} clients it holds with a known value", file=sys.stderr)  # fmt: skip
                continue
            attackable = rows[np.isin(labels[rows], values[counts >= 2])]  # a class needs a shadow and a test user
            shadow, test = (attackable[part] for part in shadow_split(labels[attackable], audit.shadow_share, seed))
            for name in audit.attackers:
                attacker = train_attacker(name, attribute, features[shadow], labels[shadow], seed)
                proba = attacker.proba(features[test])
                metrics = attack_metrics(labels[test], proba, attacker.classes, seed, attacker.prior)
                out.append(AuditedAttack(view, attacker, test, metrics | {"tested": len(test)}))
    return out


def local_outcome(attacker: Attacker, own_features: np.ndarray, own_value: str) -> np.ndarray:
    """What one client adds to the local audit's secure sum: per class (K), was the attacker right,
    is this my class, and a histogram of the attacker's confidence in my true class (K x bins)."""
    (own,) = own_class(attacker.classes, np.array([own_value]))
    if own < 0:
        raise FedUnlearnError(f"local audit: this client's {attacker.attribute} {own_value!r} is not one of the "
                              f"classes the attacker was trained on ({', '.join(attacker.classes)})")  # fmt: skip
    return outcome_from_proba(attacker.proba(own_features)[0], int(own), attacker.prior)


def outcome_from_proba(proba: np.ndarray, own: int, prior: np.ndarray | None) -> np.ndarray:
    """Right (the attacker's answer, `decide`, as the global audit's) per class, own class, and the
    confidence histogram."""
    k = len(proba)
    one_hot = np.eye(k)[own]
    histogram = np.zeros((k, CONFIDENCE_BINS))
    histogram[own, min(int(proba[own] * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] = 1
    return np.concatenate([one_hot * (decide(proba, prior) == own), one_hot, histogram.ravel()])


def local_audit(
    audited: AuditedAttack, features: np.ndarray, labels: np.ndarray, threshold: float, aggregator: Aggregator
) -> dict[str, Any]:
    """Every test user's client computes its own outcome; the server sees only the sum."""
    attacker = audited.attacker
    k = len(attacker.classes)
    if len(audited.test):
        # each client's own prediction; computed for all at once here because it is the same arithmetic
        proba = attacker.proba(features[audited.test])
        own = own_class(attacker.classes, labels[audited.test])  # the test users' classes are all known
        prior = attacker.prior
        outcomes = np.stack([outcome_from_proba(row, int(c), prior) for row, c in zip(proba, own, strict=True)])
    else:
        outcomes = np.zeros((1, 2 * k + k * CONFIDENCE_BINS))
    total = aggregator.total(outcomes)
    correct, counts = total[:k], total[k : 2 * k]
    histogram = total[2 * k :].reshape(k, CONFIDENCE_BINS)
    at_risk = histogram[:, round(threshold * CONFIDENCE_BINS) :].sum(1)  # confidence >= threshold
    present = counts > 0
    return {
        "accuracy": float(correct.sum() / counts.sum()),
        "balanced_accuracy": float((correct[present] / counts[present]).mean()),
        "at_risk": float(at_risk.sum() / counts.sum()),
        "per_class": {
            str(c): {"clients": int(n), "guessed": float(g / n), "at_risk": float(r / n)}
            for c, n, g, r in zip(attacker.classes, counts, correct, at_risk, strict=True)
            if n > 0
        },
    }


def privacy_table(
    views: dict[str, np.ndarray],
    attributes: pd.DataFrame,
    config: Config,
    aggregator: Aggregator | None = None,
    covered: dict[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, list[AuditedAttack]]:
    """Global and local audit rows (one per view x attacker x attribute x audit); `covered` as in
    `global_audit`."""
    aggregator = aggregator or PlainSum()
    audited = global_audit(views, attributes, config.audit, config.run.seed, covered)
    rows = []
    for item in audited:
        key = {"view": item.view, "attacker": item.attacker.name, "attribute": item.attacker.attribute}
        rows.append(key | {"audit": "global"} | item.metrics)
        if config.audit.local:
            labels = attribute_labels(attributes, item.attacker.attribute)
            local = local_audit(item, views[item.view], labels, config.defence.risk_threshold, aggregator)
            per_class = local.pop("per_class")
            worst = max(per_class.values(), key=lambda c: c["at_risk"])["at_risk"]
            rows.append(
                key | {"audit": "local", "chance": item.metrics["chance"], **local, "worst_class_at_risk": worst}
            )
    return pd.DataFrame(rows), audited
