"""Attribute inference: a classifier from what a party sees of a user to one of its attributes.

The attacker trains on a shadow set (20% of the users by default, stratified by the attribute)
whose attributes it knows, and is tested on the others. Metrics come from scikit-learn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pkgutil import resolve_name
from typing import Any, Protocol

import numpy as np

from fedunlearn.errors import FedUnlearnError
from fedunlearn.privacy.registry import ATTACKERS


class Classifier(Protocol):
    def fit(self, features: np.ndarray, labels: np.ndarray) -> Any: ...

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class Attacker:
    """A fitted attacker for one attribute: its classifier, the class names in column order and the
    classes' shares among the users it was trained on (None: equally likely)."""

    name: str
    attribute: str
    classes: np.ndarray  # (K,) class names; predict_proba's columns follow this order
    classifier: Classifier
    prior: np.ndarray | None = None

    def proba(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.predict_proba(np.atleast_2d(features))


def decide(proba: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """The attacker's answers: the class most likely relative to its share of the training users,
    argmax p(k | x) / p(k), the answer that maximises balanced accuracy when the probabilities are
    calibrated. A plain argmax answers the majority class for nearly everyone on an imbalanced
    attribute: an independent check (2026-12-07) had an MLP answer the 90% class 98% of the time, read
    balanced accuracy 0.52 (below null_95) where its own probabilities gave AUC 0.63."""
    return (proba if prior is None else proba / prior).argmax(axis=-1)


def make_classifier(name: str, seed: int) -> Classifier:
    """The registered attacker `name` (privacy.registry.ATTACKERS), untrained."""
    if name not in ATTACKERS:
        raise FedUnlearnError(f"unknown attacker {name!r}: choose one of {', '.join(ATTACKERS)}")
    return resolve_name(ATTACKERS[name])(seed)


def xgboost_classifier(seed: int) -> Classifier:
    from xgboost import XGBClassifier

    return XGBClassifier(
            n_estimators=200, max_depth=4, learning_rate=0.1, subsample=0.8, tree_method="hist", n_jobs=1,
            random_state=seed,
    )  # fmt: skip


def mlp_classifier(seed: int) -> Classifier:
    """Three weight layers: input -> 128 -> 64 -> classes. (scikit-learn and scipy are imported where
    they are used: every ClientApp process imports this module, and most of its messages need neither.)"""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-3, max_iter=300, random_state=seed),
    )


def shadow_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the shadow users (a `share` of each class, at least one) and of the test users.

    Every class with at least two users keeps at least one user on each side, so the attacker
    knows every class and is tested on every class."""
    if not 0 < share < 1:
        raise FedUnlearnError(f"audit.shadow_share is {share} but must be between 0 and 1")
    rng = np.random.default_rng(seed)
    shadow = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        if len(members) < 2:
            raise FedUnlearnError(
                f"attribute value {value!r} has {len(members)} user: an attacker needs at least 2 per class"
            )
        shadow.append(members[: min(len(members) - 1, max(1, round(share * len(members))))])
    shadow_index = np.sort(np.concatenate(shadow))
    return shadow_index, np.setdiff1d(np.arange(len(labels)), shadow_index)


def train_attacker(name: str, attribute: str, features: np.ndarray, labels: np.ndarray, seed: int) -> Attacker:
    from sklearn.exceptions import ConvergenceWarning

    classes, encoded = np.unique(labels, return_inverse=True)
    classifier = make_classifier(name, seed)
    with warnings.catch_warnings():  # a fixed iteration budget is part of the attacker's definition
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(features, encoded)
    prior = np.bincount(encoded, minlength=len(classes)) / len(encoded)
    return Attacker(name, attribute, classes, classifier, prior)


def attack_metrics(
    labels: np.ndarray, proba: np.ndarray, classes: np.ndarray, seed: int, prior: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest AUC, the chance levels (of balanced
    accuracy: 1/K; of accuracy: the majority class's share), and accuracy on a class-balanced
    subsample of the test users (each class cut to the smallest class's size, as AttrCloak reports),
    of the answers `decide` gives with the attacker's `prior`."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    encoded = np.searchsorted(classes, labels)
    predicted = decide(proba, prior)
    auc = attack_auc(encoded, proba)
    counts = np.bincount(encoded, minlength=len(classes))
    rng = np.random.default_rng(seed)
    smallest = counts[counts > 0].min()
    balanced = np.concatenate(
        [rng.choice(np.flatnonzero(encoded == k), smallest, replace=False) for k in np.flatnonzero(counts)]
    )
    balanced_accuracy = float(balanced_accuracy_score(encoded, predicted))
    return {
        "accuracy": float(accuracy_score(encoded, predicted)),
        "balanced_accuracy": balanced_accuracy,
        # the better of two held-out readings: as answered, or relabelled (cross-fitting a
        # permutation over many classes from few users each costs a good attacker a little)
        "balanced_accuracy_relabelled": relabelled_balanced_accuracy(encoded, predicted, len(classes), seed),
        "null_95": relabelled_null_95(encoded, predicted, len(classes), seed),
        "auc_relabelled": max(auc, attack_auc(encoded, relabelled_scores(encoded, proba, seed))),
        "macro_f1": float(f1_score(encoded, predicted, average="macro", labels=np.arange(len(classes)))),
        "auc": float(auc),
        "chance": 1.0 / len(classes),
        "majority": float(counts.max() / counts.sum()),
        "balanced_set_accuracy": float(accuracy_score(encoded[balanced], predicted[balanced])),
    }


def attack_auc(encoded: np.ndarray, proba: np.ndarray) -> float:
    """AUC for two classes, one-vs-rest macro AUC for more."""
    from sklearn.metrics import roc_auc_score

    if proba.shape[1] == 2:
        return float(roc_auc_score(encoded, proba[:, 1]))
    return float(roc_auc_score(encoded, proba, multi_class="ovr", labels=np.arange(proba.shape[1])))


def relabelled_scores(encoded: np.ndarray, proba: np.ndarray, seed: int) -> np.ndarray:
    """The attacker's class scores with their columns permuted as an adversary holding a few
    labelled users would read them for AUC (see relabelled_balanced_accuracy): on each half, the
    permutation that maximises the sum of one-vs-rest AUCs on the other half (for two classes:
    1 - AUC where the ranking runs backwards). Chosen from the scores, not from the answers: an
    attacker whose answer is always the majority class can still rank the users backwards (AUC
    0.08 stayed 0.08 when the flip followed the answers, an independent check of 2026-12-07)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import rankdata

    out = proba.copy()
    for fit, apply in _halves(len(encoded), seed):
        ranks = rankdata(proba[fit], axis=0)  # ties averaged, as roc_auc_score counts them
        members = np.eye(proba.shape[1])[encoded[fit]]  # (n, K) one-hot of the true classes
        sizes = members.sum(axis=0)
        others = len(fit) - sizes
        rank_sums = members.T @ ranks  # [i, j]: ranks by column j of the users of class i
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (rank_sums - (sizes * (sizes + 1) / 2)[:, None]) / (sizes * others)[:, None]
        auc[(sizes == 0) | (others == 0)] = 0.5  # a class absent from this half says nothing
        true_class, answer = linear_sum_assignment(auc, maximize=True)
        out[np.ix_(apply, true_class)] = proba[np.ix_(apply, answer)]
    return out


def _halves(count: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The cross-fitting's two halves of the test users: (fit on one, apply to the other), both ways."""
    first, second = np.array_split(np.random.default_rng(seed).permutation(count), 2)
    return (first, second), (second, first)


NULL_DRAWS = 200  # label permutations behind null_95


def relabelled_balanced_accuracy(encoded: np.ndarray, predicted: np.ndarray, classes: int, seed: int) -> float:
    """The better of the attacker's balanced accuracy as answered and under the relabelling of its
    classes that an adversary holding a few labelled users would pick: a below-chance attacker is
    information left, not removed (flipped, it predicts). Cross-fitted, so no user's own label
    decides how its answer is read: the test users are split in two halves, and each half's answers
    are relabelled by the permutation of classes that maximises balanced accuracy on the other half
    (an assignment problem on the row-normalised confusion matrix; for two classes: flip or not).
    From confusion counts alone: cheap enough to repeat for a null."""
    from scipy.optimize import linear_sum_assignment

    def confusion(truth: np.ndarray, answer: np.ndarray) -> np.ndarray:
        return np.bincount(truth * classes + answer, minlength=classes * classes).reshape(classes, classes)

    def balanced(counts: np.ndarray) -> float:
        present = counts.sum(axis=1) > 0
        return float((np.diag(counts)[present] / counts.sum(axis=1)[present]).mean())

    relabelled = predicted.copy()
    for fit, apply in _halves(len(encoded), seed):
        counts = confusion(encoded[fit], predicted[fit])
        true_class, answer = linear_sum_assignment(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1),
                                                   maximize=True)  # fmt: skip
        mapping = np.empty(classes, dtype=np.int64)
        mapping[answer] = true_class
        relabelled[apply] = mapping[predicted[apply]]
    return max(balanced(confusion(encoded, predicted)), balanced(confusion(encoded, relabelled)))


def relabelled_null_95(encoded: np.ndarray, predicted: np.ndarray, classes: int, seed: int) -> float:
    """The 95th percentile of balanced_accuracy_relabelled when the test users' labels are shuffled
    against the attacker's fixed answers (a permutation test: answers that carry nothing about the
    attribute, with the attacker's own answer shares). Being the better of two readings, the
    relabelled figure sits above 1/K for a blind attacker; above this band it is information left."""
    rng = np.random.default_rng([seed, NULL_DRAWS])
    null = [relabelled_balanced_accuracy(rng.permutation(encoded), predicted, classes, seed) for _ in range(NULL_DRAWS)]
    return float(np.percentile(null, 95))


def attribute_inference(
    name: str, attribute: str, features: np.ndarray, labels: np.ndarray, seed: int, shadow_share: float = 0.2
) -> tuple[Attacker, np.ndarray, dict[str, float]]:
    """Train `name` on a shadow set and test it on the other users: (attacker, test users, metrics)."""
    shadow, test = shadow_split(labels, shadow_share, seed)
    attacker = train_attacker(name, attribute, features[shadow], labels[shadow], seed)
    metrics = attack_metrics(labels[test], attacker.proba(features[test]), attacker.classes, seed, attacker.prior)
    return attacker, test, metrics
