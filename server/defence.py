"""AttrCloak through Flower: every client defends its own embedding on its device; the server runs
`fedunlearn.privacy.attrcloak.cloak` (the same loop as in-process) and learns only sums.

Per defence (over `clients`, federation indices):
- query.defence_start to each client: the attributes' class lists, whether it defends, for DD the
  frozen shared part. The client notes its embedding and its class index per attribute.
- once per attribute, two SecAgg+ sums: class sums (count, sum e, sum e e^T), then, with the means
  broadcast, the fourth powers for the Ledoit-Wolf intensities.
Per step:
- per attribute, SecAgg+ class sums of the current embeddings; the server fits the Gaussians and
  differentiates L_AU with respect to the sums;
- one SecAgg+ sum whose task broadcasts those gradients: each client derives its own g_AU and g_R
  (DD: its own training loss on its own minibatch), keeps them, and contributes g_R.g_R, g_AU.g_R,
  g_AU.g_AU (zero if it does not defend, so the sum does not tell who defends);
- query.defence_step with the min-norm weight to the defending clients: each takes its Adam step.
Finally query.defence_finish: the defended embedding becomes the client's user part.

Bounds (every contribution must lie within them, else the client refuses and the sum fails):
class sums CLASS_SUMS_BOUND; fourth powers (1.02 T)^2, where T = sum ||e - mean||^2 over all clients
is known from the class sums and bounds every single ||e - mean_c||^2; products PRODUCTS_BOUND.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from fedunlearn.config import Config
from fedunlearn.errors import FedUnlearnError
from fedunlearn.federation import cached_federation
from fedunlearn.models import Arrays
from fedunlearn.privacy.attrcloak import AttributeGradient, DefenceOutcome, cloak
from fedunlearn.privacy.gaussian import ClassSums
from server.pool import CLASS_SUMS_BOUND, PRODUCTS_BOUND, FlowerPool

FOURTH_POWER_MARGIN = 1.02  # over the largest possible ||e - mean||^4, for the rounding in the sums


class FlowerCloakClients:
    """`CloakClients` over Flower: the sums come from SecAgg+, the steps happen on the clients."""

    def __init__(
        self,
        pool: FlowerPool,
        clients: list[int],
        attributes: list[str],
        classes: list[list[str]],
        variant: str,
        lr: float,
        defending: list[bool],
        shared: Arrays | None,
        products_bound: float = PRODUCTS_BOUND,
        class_sums_bound: float = CLASS_SUMS_BOUND,
    ) -> None:
        if variant == "dd" and shared is None:
            raise ValueError("AttrCloak-DD on Flower needs the shared part for the clients' own training loss")
        self.pool, self.clients, self.attributes, self.classes = pool, clients, attributes, classes
        self.variant, self.lr, self.defending = variant, lr, [c for c, flag in zip(clients, defending) if flag]
        self.products_bound, self.class_sums_bound = products_bound, class_sums_bound
        self.sums: dict[int, ClassSums] = {}
        pool.defence_start(clients, attributes, classes, defending, shared if variant == "dd" else None)

    def class_sums(self, attribute: int) -> ClassSums:
        name, classes = self.attributes[attribute], self.classes[attribute]
        sums = self.pool.class_sums(name, self.clients, self.class_sums_bound, classes, defence=True)
        self.sums[attribute] = sums
        return sums

    def fourth_powers(self, attribute: int, means: np.ndarray, global_mean: np.ndarray) -> np.ndarray:
        sums = self.sums[attribute]  # the class sums these means came from
        scatter = float(np.trace(sums.outers.sum(0)) - sums.counts.sum() * global_mean @ global_mean)
        bound = max(FOURTH_POWER_MARGIN * scatter, 1e-12) ** 2
        name, classes = self.attributes[attribute], self.classes[attribute]
        return self.pool.fourth_powers(name, classes, means, global_mean, self.clients, bound)

    def products(self, step: int, gradients: list[AttributeGradient]) -> np.ndarray:
        return self.pool.cloak_products(step, self.variant, gradients, self.clients, self.products_bound)

    def step(self, weight: float) -> None:
        self.pool.defence_step(self.defending, weight, self.lr)

    def finish(self) -> None:
        self.pool.defence_finish(self.clients)


def flower_attrcloak(
    pool: FlowerPool,
    clients: list[int],
    attributes: list[str],
    variant: str,
    steps: int,
    lr: float,
    defending: Sequence[bool] | np.ndarray,
    shared: Arrays | None = None,
    classes: list[list[str]] | None = None,
    fixed_weight: float | None = None,
    products_bound: float = PRODUCTS_BOUND,
) -> DefenceOutcome:
    """AttrCloak-DD/-DF (`variant`) on `clients` through Flower messages; `defending[i]` says whether
    clients[i] moves (all contribute to the sums). Classes per attribute default to the dataset's
    sorted values. When it returns, each client holds its defended embedding as its user part; the
    server has only the per-step L_AU and weights (the outcome's `embeddings` is None)."""
    started = time.perf_counter()
    classes = classes if classes is not None else [pool.attribute_classes(name) for name in attributes]
    flags = [bool(flag) for flag in defending]
    remote = FlowerCloakClients(pool, clients, attributes, classes, variant, lr, flags, shared, products_bound)
    losses, weights = cloak(remote, len(attributes), variant, steps, fixed_weight)
    remote.finish()
    return DefenceOutcome(None, losses, weights, time.perf_counter() - started)


def check_flower_privacy(config: Config) -> None:
    """Refuse, before any training, the privacy settings the flower engine cannot honour."""
    defence = config.defence
    if defence.compare:
        raise FedUnlearnError(
            "defence.compare also runs D2D-R and U2U-R, which have no Flower path yet: use run.engine = auto"
        )
    if defence.method != "none" and not defence.method.startswith("attrcloak"):
        raise FedUnlearnError(f"defence.method = {defence.method!r} has no Flower path yet: use attrcloak-dd or -df")
    if defence.method != "none" and defence.clients == "at-risk":
        raise FedUnlearnError("defence.clients = 'at-risk' is not supported on the flower engine: use all or listed")


def defend_on_clients(
    config: Config, pool: FlowerPool, clients: list[int], shared: Arrays, defending: Sequence[bool] | None = None
) -> DefenceOutcome:
    """`run.engine = "flower"` with `defence.method = attrcloak-dd | attrcloak-df`: the configured
    AttrCloak on `clients` (those still in the federation after training), through Flower.
    `defending[i]`: whether clients[i] moves; by default from `defence.clients` (all or listed;
    at-risk is refused: each client would have to run the audit's attackers on itself, and no
    message does that yet; choosing from the auditor's reading would make the defence rest on it)."""
    check_flower_privacy(config)
    defence = config.defence
    federation = cached_federation(config.data, config.run.seed)
    if defending is None:
        listed = set(defence.client_ids)
        defending = [defence.clients == "all" or federation.client_ids[i] in listed for i in clients]
    attributes = config.audit.attributes or list(federation.dataset.attributes.columns)
    fixed = None if defence.cloak_weight < 0 else defence.cloak_weight
    variant = defence.method.removeprefix("attrcloak-")
    return flower_attrcloak(
        pool, clients, attributes, variant, defence.steps, defence.lr, defending, shared, fixed_weight=fixed
    )
