"""AttrCloak-DF with and without its covariance brake, from the trained embeddings of an audited run:
where each attribute's class means and class covariances end up, and what attackers read.

    python benchmarks/cloak_brake.py RUN [RUN ...] [--splits 5]

RUN is a run folder of an audited run (its central_view_embeddings.npz and config.toml), e.g. one
seed of `fedunlearn experiment experiments/attribute_ml100k.toml --only trained`. For each rule
(`null-means`: the covariance term pushes until the means' null stop; `null`: it stops once its
public halves disagree) the defence runs in-process from the trained embeddings (every client
defends, the run's seed and defence settings) and the script prints, per attribute, the steps, the
steps at which the brake was checked (the covariance term was on at all but the last of them,
unless it never turned off), the class means' separation against its null level, the covariance agreement (`attrcloak.
covariance_agreement`, mean of its draws; > 0: the class covariances still carry the attribute,
< 0: more alike than random halves), and for gender (the first attribute) and age the MLP's and
XGBoost's balanced accuracy as given / relabelled and AUC, mean over `--splits` shadow/test splits.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedunlearn.config import derive, load_config
from fedunlearn.privacy.attacks import attack_metrics, shadow_split, train_attacker
from fedunlearn.privacy.attrcloak import (
    SPLIT_DRAWS,
    MatrixClients,
    PseudoClasses,
    attribute_gradients,
    class_means,
    cloak,
    covariance_agreement,
    null_separation,
    shrinkage_from,
)
from fedunlearn.privacy.common import AttributeClasses, PlainSum
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.privacy.stage import cloak_settings, defence_classes
from fedunlearn.runs.results import ATTRIBUTE_PREFIX, EMBEDDINGS_FILE


def everyone(embeddings: np.ndarray, attributes: list[AttributeClasses], lr: float, pseudo: PseudoClasses) -> tuple:
    """Arguments of the in-process clients for these embeddings, every client defending (DF)."""
    return embeddings, attributes, "df", lr, np.ones(len(embeddings), bool), None, PlainSum(), pseudo


class CountingClients(MatrixClients):
    """The in-process clients, counting the covariance brake's split sums per attribute."""

    def __init__(self, embeddings: np.ndarray, attributes: list[AttributeClasses], lr: float, pseudo: PseudoClasses):
        super().__init__(*everyone(embeddings, attributes, lr, pseudo))
        self.split_sums: dict[int, int] = {}

    def split_class_sums(self, attribute: int, keys: Sequence[int]) -> list[ClassSums]:
        self.split_sums[attribute] = self.split_sums.get(attribute, 0) + 1
        return super().split_class_sums(attribute, keys)


class Probe:
    """The statistics `cloak` stops on, read off a set of embeddings (a plain sum over its rows),
    with the shrinkage and the null level fixed as `cloak` fixes them, from the trained embeddings."""

    def __init__(self, trained: np.ndarray, attributes: list[AttributeClasses], pseudo: PseudoClasses) -> None:
        self.attributes, self.pseudo = attributes, pseudo
        start = MatrixClients(*everyone(trained, attributes, 0.0, pseudo))
        self.shrinkages, self.nulls = [], []
        for attribute in range(len(attributes)):
            sums = start.class_sums(attribute)
            shrinkage = shrinkage_from(sums, start.fourth_powers(attribute, *class_means(sums)))
            self.shrinkages.append(shrinkage)
            self.nulls.append(null_separation(start, attribute, sums.counts, shrinkage))

    def read(self, embeddings: np.ndarray) -> list[tuple[float, float, float]]:
        """(separation, its null level, covariance agreement) per attribute."""
        now = MatrixClients(*everyone(embeddings, self.attributes, 0.0, self.pseudo))
        out = []
        for attribute, (shrinkage, null) in enumerate(zip(self.shrinkages, self.nulls, strict=True)):
            separation = attribute_gradients(now.class_sums(attribute), shrinkage).separation
            splits = now.split_class_sums(attribute, [attribute * SPLIT_DRAWS + d for d in range(SPLIT_DRAWS)])
            agreement = np.mean([covariance_agreement(split, float(shrinkage[-1])) for split in splits])
            out.append((separation, null, float(agreement)))
        return out


def readings(embeddings: np.ndarray, labels: np.ndarray, splits: int) -> dict[str, str]:
    out = {}
    for attacker in ("mlp", "xgboost"):
        metrics = []
        for split in range(splits):
            shadow, test = shadow_split(labels, 0.2, split)
            fitted = train_attacker(attacker, "a", embeddings[shadow], labels[shadow], split)
            metrics.append(
                attack_metrics(labels[test], fitted.proba(embeddings[test]), fitted.classes, split, fitted.prior)
            )
        frame = pd.DataFrame(metrics).mean()
        out[attacker] = (f"{frame['balanced_accuracy']:.3f} / {frame['balanced_accuracy_relabelled']:.3f} "
                         f"(AUC {frame['auc']:.3f})")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args()
    print("| run | rule | steps | brake checks | attribute | separation / null | covariance agreement | MLP "
          "| XGBoost |")  # fmt: skip
    print("|:--|:--|--:|--:|:--|:--|--:|:--|:--|")
    for run in args.runs:
        if not (run / EMBEDDINGS_FILE).exists():
            raise SystemExit(f"{run}: no {EMBEDDINGS_FILE}: give the folder of an audited run")
        saved = np.load(run / EMBEDDINGS_FILE)
        config = load_config(run / "config.toml")
        names = [key[len(ATTRIBUTE_PREFIX):] for key in saved.files if key.startswith(ATTRIBUTE_PREFIX)]
        frame = pd.DataFrame({name: saved[ATTRIBUTE_PREFIX + name] for name in names})
        attributes = defence_classes(frame, names)
        trained = saved["before"]
        pseudo = PseudoClasses(config.run.seed, [str(c) for c in saved["clients"]])
        probe = Probe(trained, attributes, pseudo)
        states = {"trained": (trained, 0, {})}
        for rule in ("null-means", "null"):
            trial = derive(config, {"defence.method": "attrcloak-df", "defence.cloak_stop": rule})
            settings = cloak_settings(trial.defence)
            clients = CountingClients(trained, attributes, config.defence.lr, pseudo)
            trace = cloak(clients, len(attributes), "df", config.defence.steps, settings.fixed_weight,
                          settings.stop_at_null, settings.brake_covariance)  # fmt: skip
            states[rule] = (clients.current.detach().numpy(), len(trace.losses), clients.split_sums)
        for rule, (embeddings, steps, split_sums) in states.items():
            stats = probe.read(embeddings)
            for index, name in enumerate(names):
                separation, null, agreement = stats[index]
                checks = split_sums.get(index, 0)
                read = {"mlp": "", "xgboost": ""}
                if index < 2:  # gender and age: occupation's 21 classes take the attackers long
                    read = readings(embeddings, frame[name].to_numpy(), args.splits)
                print(f"| {run} | {rule} | {steps} | {checks} | {name} | {separation:.3f} / {null:.3f} "
                      f"| {agreement:+.3f} | {read['mlp']} | {read['xgboost']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
