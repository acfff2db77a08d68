"""The post-training defences through Flower: every client defends its own embedding on its device;
the server runs the same loop as in-process (`fedunlearn.privacy.attrcloak.cloak`,
`fedunlearn.privacy.baselines.regularise`) and learns only sums.

Every defence (over `clients`, federation indices) begins with SecAgg+ sums of counts per
attribute (one-hot rows alone), taken again without the holders of a value fewer than three
clients share until no class is small (`cells.summable_population`): those clients send zeros to
every sum, as a sum over one or two clients, or the difference of two attributes' totals, would
give them away. Then query.defence_start to each client: the attributes' class lists (and the
values left out), for AttrCloak-DD the frozen shared part, and whether it defends, or
(`defence.clients = "at-risk"`) the audit's embedding attackers and the risk threshold, from which
the client decides alone (`fedunlearn.privacy.stage.at_risk` on its own embedding and attributes);
then the step messages go to every client, and one that does not defend ignores them, so the server
learns who defends only from what the sums reveal. The client notes its embedding and its class
index per attribute. With `defence.compare` it also keeps its trained user part and every defence
starts from that (query.defence_end drops it at the end). Every defence ends with
query.defence_finish: the defended embedding becomes the client's user part.

AttrCloak:
- once per attribute, two SecAgg+ sums: class sums (count, sum e, sum e e^T), then, with the means
  broadcast, the fourth powers for the Ledoit-Wolf intensities; for the null level the counts of
  all candidate draws' pseudo-classes, then the sums of the first eight with none of one or two
  clients, in one SecAgg+ sum each; for the covariance brake (its counts the first time) the
  sums per class and half, a class with a half of one or two clients left out of that split.
Per step:
- per attribute, SecAgg+ class sums of the current embeddings; the server fits the Gaussians and
  differentiates L_AU with respect to the sums;
- one SecAgg+ sum whose task broadcasts those gradients: each client derives its own g_AU and g_R
  (DD: its own training loss on its own minibatch), keeps them, and contributes g_R.g_R, g_AU.g_R,
  g_AU.g_AU (zero if it does not defend, so the sum does not tell who defends);
- query.defence_step with the min-norm weight to the defending clients (at-risk: to all): each
  defending client takes its Adam step.

D2D-R and U2U-R, per step:
- per attribute one SecAgg+ sum: U2U-R, the class sums above; D2D-R, the client's one-hot class and
  its Fourier features in its class's block (`feature_contribution`; the features' scale comes
  from two rounds of class sums before the first step, the second with the bound the first gives);
- query.regularised_step broadcasts dL/d(the sums): each defending client derives its own gradient
  and takes its Adam step.

Bounds (every contribution must lie within them, else the client refuses and the sum fails):
class sums CLASS_SUMS_BOUND; fourth powers 1, as shares of levels up to (1.02 T)^2, where T = sum
||e - mean||^2 over all clients is known from the class sums and bounds every single
||e - mean_c||^2 (`attrcloak.fourth_power_levels`); products PRODUCTS_BOUND;
D2D-R's features FEATURE_SUMS_BOUND (a one-hot class, and Fourier features within sqrt(2 / F)).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clients.messages import DefenceStart
from fedunlearn.config import Config
from fedunlearn.fl.federation import cached_federation
from fedunlearn.models.base import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.attrcloak import AttributeGradient, cloak, fourth_power_levels, join_levels
from fedunlearn.privacy.baselines import FourierFeatures, SumsGradient, regularise
from fedunlearn.privacy.cells import clean_draw, kept_halves, summable_population
from fedunlearn.privacy.common import DefenceOutcome, StepDone, no_progress
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.privacy.registry import DEFENCES
from fedunlearn.privacy.stage import cloak_settings
from server.pool import FlowerPool
from server.privacy_queries import CLASS_SUMS_BOUND, FEATURE_SUMS_BOUND, PRODUCTS_BOUND, Draws, LeftOut

FOURTH_POWER_MARGIN = 1.02  # over the largest possible ||e - mean||^4 (or ||e||^2), for the rounding in the sums


@dataclass
class OnClients:
    """Where a defence runs: these clients (federation indices), told `start` when it begins;
    `defending[i]`: whether clients[i] defends, or None when each decides alone (at-risk)."""

    pool: FlowerPool
    clients: list[int]
    start: DefenceStart
    defending: list[bool] | None
    draw_counts: dict[tuple[int, Draws], np.ndarray] = field(default_factory=dict)

    def begin(self) -> None:
        self.pool.defence_start(self.clients, self.start, self.defending)

    def classes(self, attribute: int) -> tuple[str, list[str], LeftOut]:
        """The attribute's name, the classes its sums keep, the values whose holders are left out."""
        return self.start.attributes[attribute], self.start.classes[attribute], self.start.left_out

    def class_sums(self, attribute: int, bound: float) -> ClassSums:
        name, classes, left_out = self.classes(attribute)
        return self.pool.class_sums(name, self.clients, bound, classes, left_out, defence=True)

    def draw_counts_of(self, attribute: int, draws: Draws) -> np.ndarray:
        """The counts of each draw's random cells (keys, cells), through SecAgg+ the first time
        (a cell's members do not change during a defence)."""
        if (attribute, draws) not in self.draw_counts:
            name, classes, left_out = self.classes(attribute)
            self.draw_counts[(attribute, draws)] = self.pool.class_counts(name, self.clients, classes, left_out, draws)
        return self.draw_counts[(attribute, draws)]

    def cell_sums(self, attribute: int, draws: Draws, kept: np.ndarray, bound: float) -> list[ClassSums]:
        name, classes, left_out = self.classes(attribute)
        return self.pool.cell_sums(name, self.clients, classes, left_out, draws, kept, bound)

    @property
    def stepping(self) -> list[int]:
        """Whom the step messages go to: the defending clients when the server chose them, else all."""
        if self.defending is None:
            return self.clients
        return [client for client, flag in zip(self.clients, self.defending, strict=True) if flag]

    def finish(self) -> None:
        self.pool.defence_finish(self.clients)


class FlowerCloakClients:
    """`CloakClients` over Flower: the sums come from SecAgg+, the steps happen on the clients."""

    def __init__(
        self,
        on: OnClients,
        variant: str,
        lr: float,
        products_bound: float = PRODUCTS_BOUND,
        class_sums_bound: float = CLASS_SUMS_BOUND,
    ) -> None:
        if variant == "dd" and on.start.shared is None:
            raise ValueError("AttrCloak-DD on Flower needs the shared part for the clients' own training loss")
        self.on, self.variant, self.lr = on, variant, lr
        self.products_bound, self.class_sums_bound = products_bound, class_sums_bound
        self.sums: dict[int, ClassSums] = {}

    def class_sums(self, attribute: int) -> ClassSums:
        self.sums[attribute] = self.on.class_sums(attribute, self.class_sums_bound)
        return self.sums[attribute]

    def null_class_sums(self, attribute: int, keys: Sequence[int], shares: np.ndarray, wanted: int
                        ) -> list[ClassSums]:  # fmt: skip
        values = tuple(np.asarray(shares).tolist())
        counts = self.on.draw_counts_of(attribute, Draws(tuple(keys), values))
        clean = tuple(key for key, row in zip(keys, counts, strict=True) if clean_draw(row))[:wanted]
        if not clean:
            return []
        kept = np.ones((len(clean), len(values)), dtype=bool)
        return self.on.cell_sums(attribute, Draws(clean, values), kept, self.class_sums_bound)

    def split_class_sums(self, attribute: int, keys: Sequence[int]) -> list[ClassSums]:
        draws = Draws(tuple(keys))
        kept = kept_halves(self.on.draw_counts_of(attribute, draws))
        return self.on.cell_sums(attribute, draws, kept, self.class_sums_bound)

    def fourth_powers(self, attribute: int, means: np.ndarray, global_mean: np.ndarray) -> np.ndarray:
        """In levels (`attrcloak.fourth_power_levels`): from the typical value (scatter / n)^2 to
        (1.02 scatter)^2, a bound no client's ||e - mean_c||^4 can pass."""
        sums = self.sums[attribute]  # the class sums these means came from
        scatter = max(float(np.trace(sums.outers.sum(0)) - sums.counts.sum() * global_mean @ global_mean), 1e-12)
        tops = fourth_power_levels((scatter / sums.counts.sum()) ** 2, (FOURTH_POWER_MARGIN * scatter) ** 2)
        name, classes, left_out = self.on.classes(attribute)
        shares = self.on.pool.fourth_powers(name, classes, left_out, means, global_mean, self.on.clients, tops)
        return join_levels(shares.reshape(len(classes) + 1, len(tops)), tops)

    def products(self, step: int, gradients: list[AttributeGradient]) -> np.ndarray:
        return self.on.pool.cloak_products(step, self.variant, gradients, self.on.clients, self.products_bound)

    def step(self, weight: float) -> None:
        self.on.pool.defence_step(self.on.stepping, weight, self.lr)


class FlowerRegularisedClients:
    """`RegularisedClients` over Flower: the sums come from SecAgg+, the steps happen on the clients."""

    def __init__(self, on: OnClients, method: str, lr: float, weight: float) -> None:
        self.on, self.method, self.lr, self.weight = on, method, lr, weight

    def class_sums(self, attribute: int) -> ClassSums:
        return self.on.class_sums(attribute, CLASS_SUMS_BOUND)

    def scale_sums(self) -> ClassSums:
        """Class sums twice: the first (bound CLASS_SUMS_BOUND) bounds every client's ||e||^2, and
        so its |e_i| and |e_i e_j|, by the total T; the second, within max(1, sqrt T, T) (with a
        margin) where that is below CLASS_SUMS_BOUND, is that much finer (else the same)."""
        total = float(np.trace(self.class_sums(0).outers.sum(0)))
        return self.on.class_sums(0, min(CLASS_SUMS_BOUND, FOURTH_POWER_MARGIN * max(1.0, np.sqrt(total), total)))

    def feature_sums(self, attribute: int, phi: FourierFeatures) -> np.ndarray:
        name, classes, left_out = self.on.classes(attribute)
        return self.on.pool.feature_sums(name, classes, left_out, phi.scale, phi.seed, self.on.clients,
                                         FEATURE_SUMS_BOUND)  # fmt: skip

    def step(self, gradients: list[SumsGradient], phi: FourierFeatures | None) -> None:
        arrays = [tuple(part.numpy() for part in gradient) for gradient in gradients]
        scale, seed = (phi.scale, phi.seed) if phi is not None else (0.0, 0)
        n = len(self.on.clients)
        self.on.pool.regularised_step(self.on.stepping, self.method, arrays, self.weight, self.lr, n, scale, seed)


def on_clients(
    pool: FlowerPool,
    clients: list[int],
    attributes: list[str],
    defending: Sequence[bool] | None,
    classes: list[list[str]] | None = None,
    shared: Arrays | None = None,
    attackers: Sequence[Attacker] = (),
    risk_threshold: float = 0.5,
    keep_trained: bool = False,
    say_left_out: bool = True,
) -> OnClients:
    """The setting of one defence; classes per attribute default to the dataset's sorted values.
    First secure sums of counts (`cells.summable_population`): the holders of a value under three
    clients are left out of every sum, and an attribute with fewer than two classes left is not
    defended."""
    classes = classes if classes is not None else [pool.attribute_classes(name) for name in attributes]
    values = dict(zip(attributes, classes, strict=True))

    def count(defended: list[str], left_out: dict[str, list[str]]) -> dict[str, np.ndarray]:
        return {name: pool.class_counts(name, clients, values[name], left_out)[0] for name in defended}

    population = summable_population(values, count, len(clients), say_left_out)
    start = DefenceStart(list(population.classes), list(population.classes.values()), population.left_out,
                         None, shared, list(attackers), risk_threshold, keep_trained)  # fmt: skip
    return OnClients(pool, clients, start, None if defending is None else [bool(flag) for flag in defending])


def flower_attrcloak(
    on: OnClients, variant: str, steps: int, lr: float, fixed_weight: float | None = None,
    products_bound: float = PRODUCTS_BOUND, stop_at_null: bool = False, brake_covariance: bool = False,
    unit_balance: bool = False, step_done: StepDone = no_progress,
) -> DefenceOutcome:  # fmt: skip
    """AttrCloak-DD/-DF (`variant`) on the clients through Flower messages (all contribute to the
    sums, the defending ones move), for `steps` steps or until every attribute is at its null level
    (`stop_at_null`, `brake_covariance`: `attrcloak.cloak`). When it returns, each client holds its defended embedding
    as its user part; the server has only the per-step L_AU and weights (the outcome's `embeddings`
    is None)."""
    started = time.perf_counter()
    remote = FlowerCloakClients(on, variant, lr, products_bound)
    on.begin()
    trace = cloak(
        remote, len(on.start.attributes), variant, steps, fixed_weight, stop_at_null, brake_covariance, unit_balance,
        step_done,
    )  # fmt: skip
    on.finish()
    return DefenceOutcome(None, trace.losses, trace.weights, time.perf_counter() - started, trace.retention_shares)


def flower_regularised(
    on: OnClients, method: str, steps: int, lr: float, weight: float, seed: int, step_done: StepDone = no_progress
) -> DefenceOutcome:
    """D2D-R / U2U-R (`method`) on the clients through Flower messages, as `flower_attrcloak`."""
    started = time.perf_counter()
    remote = FlowerRegularisedClients(on, method, lr, weight)
    on.begin()
    losses = regularise(remote, method, [len(classes) for classes in on.start.classes], steps, seed, step_done)
    on.finish()
    return DefenceOutcome(None, losses, [weight] * steps, time.perf_counter() - started)


def defend_on_clients(
    config: Config,
    pool: FlowerPool,
    clients: list[int],
    shared: Arrays,
    defending: Sequence[bool] | None = None,
    attackers: Sequence[Attacker] = (),
    step_done: StepDone = no_progress,
    say_left_out: bool = True,
) -> DefenceOutcome:
    """`run.engine = "flower"`: the configured post-training defence on `clients` (those still in
    the federation after training), through Flower (`say_left_out` False: the privacy stage has
    named the values it leaves out already). `defending[i]`: whether clients[i] moves; by
    default from `defence.clients` (all or listed); with at-risk each client decides alone from
    `attackers` (the audit's, on the embedding view) and `defending` is not used."""
    defence = config.defence
    federation = cached_federation(config.data, config.run.seed)
    if defence.clients == "at-risk":
        defending = None
    elif defending is None:
        listed = set(defence.client_ids)
        defending = [defence.clients == "all" or federation.client_ids[i] in listed for i in clients]
    attributes = config.audit.attributes or list(federation.dataset.attributes.columns)
    kept = shared if DEFENCES[defence.method].variant == "dd" else None  # DD keeps the recommendation data
    on = on_clients(pool, clients, attributes, defending, None, kept, attackers, defence.risk_threshold,
                    defence.compare, say_left_out)  # fmt: skip
    if DEFENCES[defence.method].loop == "attrcloak":
        settings = cloak_settings(defence)
        return flower_attrcloak(
            on, settings.variant, defence.steps, defence.lr, settings.fixed_weight,
            stop_at_null=settings.stop_at_null, brake_covariance=settings.brake_covariance,
            unit_balance=settings.unit_balance, step_done=step_done,
        )  # fmt: skip
    return flower_regularised(
        on, defence.method, defence.steps, defence.lr, defence.weight, config.run.seed, step_done
    )  # fmt: skip
