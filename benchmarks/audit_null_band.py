"""What the attribute audit reads for an attacker that knows nothing: the band of balanced accuracy
(as given, and relabelled) that chance alone produces on a data set's test users, so that a
defended figure is read against the audit's own noise, not against 1/K.

    FEDUNLEARN_DATA_DIR=../shared/datasets python benchmarks/audit_null_band.py [--dataset ml-100k] [--draws 300]

The test users are the audit's (the stratified split of `audit.shadow_share`, seed 0); each draw is
an attacker answering with random class probabilities. Prints, per attribute, chance, the 5-95%
band as given, the mean and 95th percentile of the relabelled reading (the better of the answers
as given and cross-fitted relabelled, as audit.csv reports it) and the 5-95% band of the AUC.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from fedunlearn.config import Config
from fedunlearn.fl.federation import cached_federation
from fedunlearn.privacy.attacks import attack_auc, relabelled_balanced_accuracy, relabelled_scores, shadow_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    config = Config()
    config.data.dataset = args.dataset
    federation = cached_federation(config.data, config.run.seed)
    print("| attribute | classes | chance | as given, 5-95% | relabelled, mean | relabelled, 95th percentile "
          "| AUC, 5-95% | AUC relabelled, mean | AUC relabelled, 95th percentile |")  # fmt: skip
    print("|:--|--:|--:|:--|--:|--:|:--|--:|--:|")
    for name in federation.dataset.attributes.columns:
        labels = federation.dataset.attributes[name].astype(str).to_numpy()
        _, encoded = np.unique(labels, return_inverse=True)
        k = int(encoded.max()) + 1
        _, test = shadow_split(labels, config.audit.shadow_share, config.run.seed)
        truth = encoded[test]
        rng = np.random.default_rng(1)
        given, relabelled, aucs, aucs_relabelled = [], [], [], []
        for draw in range(args.draws):
            proba = rng.dirichlet(np.ones(k), size=len(truth))
            predicted = proba.argmax(1)
            as_given = balanced_accuracy_score(truth, predicted)
            given.append(as_given)
            relabelled.append(relabelled_balanced_accuracy(truth, predicted, k, draw))
            aucs.append(attack_auc(truth, proba))
            read_proba = relabelled_scores(truth, proba, draw)
            aucs_relabelled.append(max(aucs[-1], attack_auc(truth, read_proba)))  # as audit.csv's auc_relabelled
        low, high = np.percentile(given, [5, 95])
        auc_low, auc_high = np.percentile(aucs, [5, 95])
        print(f"| {name} | {k} | {1 / k:.3f} | [{low:.3f}, {high:.3f}] | {np.mean(relabelled):.3f} "
              f"| {np.percentile(relabelled, 95):.3f} | [{auc_low:.3f}, {auc_high:.3f}] "
              f"| {np.mean(aucs_relabelled):.3f} | {np.percentile(aucs_relabelled, 95):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
