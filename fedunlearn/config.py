"""One typed, validated run configuration: TOML and `--set key=value` in, clear errors out."""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.server_optimizer import SERVER_OPTIMIZERS
from fedunlearn.models import MODELS
from fedunlearn.privacy.registry import ATTACKERS, DEFENCES
from fedunlearn.unlearning.registry import METHODS


class Section:
    """A config section (or the whole config): settable while it is built, frozen once validated,
    so every part of a run reads the values that were checked. `derive` makes a changed copy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise FedUnlearnError(
                f"the config is frozen after validation (setting {name}): derive(config, {{...}}) makes a checked copy"
            )
        object.__setattr__(self, name, value)

    def _freeze(self, frozen: bool) -> None:
        object.__setattr__(self, "_frozen", frozen)
        for value in self.__dict__.values():
            if isinstance(value, Section):
                value._freeze(frozen)


@dataclass
class DataConfig(Section):
    dataset: str = "synthetic"  # synthetic | ml-100k | ml-1m | csv
    path: str = ""  # csv: the interactions file
    users_path: str = ""  # csv: optional users file (extra columns are attributes)
    min_rating: float = 0.0  # implicit feedback: keep ratings >= this (0 keeps every rating)
    test_negatives: int = 99  # sampled items the test item is ranked against
    synthetic_users: int = 600
    synthetic_items: int = 400
    synthetic_interactions: int = 40  # mean interactions per user
    synthetic_strength: float = 1.0  # how strongly attributes shape taste (0 = not at all)
    exclude_clients: list[str] = field(default_factory=list)  # never take part (their items stay in the catalogue)


@dataclass
class ModelConfig(Section):
    name: str = "mf"  # one of fedunlearn.models.MODELS
    dim: int = 32
    mlp_layers: list[int] = field(default_factory=lambda: [64, 32, 16])  # ncf only
    loss: str = "bpr"  # bpr | bce
    negatives: int = 4  # sampled negatives per positive in training
    init_std: float = 0.1


@dataclass
class TrainConfig(Section):
    rounds: int = 30
    local_epochs: int = 1
    optimizer: str = "adam"  # sgd | adam (on the client)
    client_optimizer_state: str = "fresh"  # fresh: a new optimizer each round | user: the user part's Adam state kept
    lr: float = 0.05  # client learning rate
    batch_size: int = 64
    weight_decay: float = 0.001  # L2 on the embeddings a batch uses
    server_lr: float = 3.0  # server step on item rows: row-wise means move popular items slowly, this makes up for it
    dense_server_lr: float = 1.0  # server step on dense layers (NCF's MLP): plain FedAvg; 3 made NCF oscillate
    server_optimizer: str = "sgd"  # on item rows: sgd (server_lr x the mean change) | adam | yogi (FedAdam / FedYogi)
    server_optimizer_lr: float = 0.01  # adam / yogi: the server's learning rate (eta)
    fraction: float = 1.0  # share of clients sampled per round, in (0, 1]
    negative_sampler: str = "uniform"  # uniform | fru (a beta share from FRU's informative pool)
    pool_share: float = 0.1  # fru sampler: the pool holds the top share of items by each criterion
    max_loss_growth: float = 100.0  # the run stops as diverged when a round's loss is over this x round 1's (0: off)
    min_replies: int = 1  # a round with fewer valid replies (or fewer than it asked for, if less) stops the run
    reject_norm_ratio: float = 100.0  # reject an upload whose norm is over this x the round's median (0: off)
    clip_norm_ratio: float = 0.0  # robust, opt-in: clip each upload to this x the round's median norm (0: off)
    aggregation: str = "mean"  # mean (example-weighted) | trimmed-mean | median (robust, unweighted, row-wise)
    trim: float = 0.1  # trimmed-mean: share of the values cut at each end of every coordinate
    reply_timeout: float = 1800.0  # flower engine: seconds to wait for replies before counting them as timeouts


@dataclass
class CentralConfig(Section):
    epochs: int = 30
    lr: float = 0.001  # Adam
    batch_size: int = 256
    weight_decay: float = -1.0  # L2 on the embeddings a minibatch uses (-1: train.weight_decay's value)


@dataclass
class EvalConfig(Section):
    every: int = 5  # evaluate every N rounds (and after the last round)
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    full_ranking: bool = False  # also rank the test item against every unseen item
    select: str = "last"  # last | best_valid: which evaluated round the final metrics come from


@dataclass
class UnlearnConfig(Section):
    method: str = "none"  # a name in unlearning.registry.METHODS
    drop: str = ""  # e.g. "12,57@20;3@30": clients leave before that round and ask to be forgotten
    drop_random: str = ""  # e.g. "5%@20" (of the federation) or "7@20": seeded, among the clients still present
    dt: int = 2  # FedEraser: checkpoint every dt rounds
    r: float = 0.5  # FedEraser: calibration epochs = r * local epochs
    alpha: float = 0.5  # FRU: share of each update's touched rows kept
    beta: float = 0.5  # FRU: share of the negatives drawn from the informative pool
    lam: float = 0.1  # FRU: replay epochs = lam * local epochs
    poison: bool = False  # the leaving clients attack: they promote unlearn.target_item while training
    poison_boost: float = 30.0  # attackers scale their change of the target's rows by this factor
    target_item: int = -1  # item index the attackers promote (-1: the least popular training item)
    attackers: list[str] = field(default_factory=list)  # set from the drop schedule when poison is on
    compare: bool = False  # at each event also try every method on a copy and report the table
    history_dtype: str = "int8"  # stored client updates: int8 (one scale per row) | float16 | float32
    user_parts: str = "keep"  # retained clients' user parts when a method rolls the model back: keep | reset


RISK_TENTHS = 10  # the local audit's histogram of the attacker's confidence has this many bins (privacy.audit)


@dataclass
class DefenceConfig(Section):
    method: str = "none"  # post-training, on user embeddings: none | attrcloak-dd | attrcloak-df | d2d-r | u2u-r
    compare: bool = False  # also try every post-training defence on a copy of the trained model
    upload: str = "none"  # on every upload while training: none | ldp | pseudo-items | ldp+pseudo-items | secagg
    secagg_bound: float = 1.0  # secagg: the largest change of one shared value a client may send (it refuses more)
    # secagg: a round's change of an item row is summed only if at least this many of its clients touched the row
    # (a first secure sum counts them); over one client the sum would be that client's change. 1: every row
    secagg_min_clients: int = 2
    clients: str = "all"  # who defends: all | listed (defence.client_ids) | at-risk (own local audit)
    client_ids: list[str] = field(default_factory=list)
    risk_threshold: float = 0.5  # at-risk: the shipped attacker's confidence in the client's true class
    steps: int = 100  # post-training defences: Adam steps
    lr: float = 0.01
    cloak_weight: float = -1.0  # AttrCloak's weight on the attribute loss: -1 = closed-form min-norm per step
    # AttrCloak: null (each attribute's class means stop at the level random classes give, its covariance term
    # once its halves disagree) | null-means (the means' stop only, the covariance term throughout) | steps (paper)
    cloak_stop: str = "null"
    # AttrCloak's min-norm weight: raw (the paper: on the two gradients as they are) | unit (on the gradients
    # scaled to unit length, so each loss shapes the step whatever its scale; docs/PRIVACY.md)
    cloak_balance: str = "raw"
    weight: float = 0.001  # D2D-R / U2U-R: fixed weight of sum |e - e_original|^2
    batch: int = 32  # AttrCloak-DD: positives per client per step for the retention loss
    ldp_mechanism: str = "gaussian"  # gaussian ((epsilon, delta), L2 clip) | laplace (epsilon, L1 clip)
    ldp_clip: float = 1.0  # norm each upload is clipped to (the sensitivity)
    ldp_epsilon: float = 8.0
    ldp_delta: float = 1e-5
    pseudo_items: float = 1.0  # trained: fake positives per own positive, on average; else fake rows per real row
    # fake rows: trained (a fixed set of fake positives trained like own ones, the user part and dense layers held
    # still) | gaussian (fitted to the real rows) | mimic (jittered real rows); docs/PRIVACY.md
    pseudo_rows: str = "trained"
    # Each client's own draws (LDP noise, pseudo-items, AttrCloak's pseudo-classes and halves) are seeded by
    # this secret, which only the client holds: a SuperNode's --node-config noise-secret=N sets it on its
    # client. -1 (every simulation) seeds them from run.seed, which the server knows: reproducible, and the
    # server could draw the same noise and take it off. Never set in a config (refused).
    private_seed: int = -1

    def trains_fake_items(self) -> bool:
        """Fake positives made by training (client.plan_local_training), not padded on after it."""
        return "pseudo-items" in self.upload and self.pseudo_rows == "trained"


@dataclass
class AuditConfig(Section):
    enabled: bool = False  # audit attribute privacy after training (always on when a defence is set)
    attackers: list[str] = field(default_factory=lambda: list(ATTACKERS))
    attributes: list[str] = field(default_factory=list)  # empty: every attribute the dataset has
    shadow_share: float = 0.2  # users whose attribute the attacker knows (stratified)
    uploads: bool = True  # also attack the last round's uploads (the server's own view)
    local: bool = True  # also run the local audit (each client, on its own device)


# [faults]: kind -> what a faulty client does instead of a well-formed upload (fedunlearn.fl.faults)
FAULT_KINDS: dict[str, str] = {
    "exception": "raises an error instead of replying (and keeps nothing of the round)",
    "nan": "one uploaded value is NaN",
    "inf": "one uploaded value is +inf",
    "shape": "the row changes lose their last column",
    "item_range": "one item id lies past the catalogue",
    "huge_norm": "the row changes are scaled by 1e6",
    "timeout": "replies train.reply_timeout + 1 s late (flower engine)",
    "spoof_id": "claims to be the next client",
}


@dataclass
class FaultsConfig(Section):
    share: float = 0.0  # share of the clients asked to train that misbehave (seeded per round and client)
    kinds: list[str] = field(default_factory=lambda: ["exception"])  # some of FAULT_KINDS


@dataclass
class RunConfig(Section):
    seed: int = 0
    # the training draws (initial parameters, negatives and minibatches, sampled clients); -1: seed.
    # Another value with the same seed keeps the data, the test items and the drops: training's own spread
    train_seed: int = -1
    engine: str = "auto"  # auto | batched | inprocess | flower
    device: str = "auto"  # auto | cpu | cuda
    mode: str = "federated"  # federated | central | popularity
    num_cpus: int = 2  # flower engine: Ray CPUs
    client_cpus: float = 1.0  # flower engine: CPUs per simulated client
    client_gpus: float = 0.0  # flower engine: GPUs per simulated client (a share: 0.25 puts four on a GPU)
    ray_address: str = ""  # flower engine: join this running Ray cluster (host:port); empty starts one on 127.0.0.1

    def training_seed(self) -> int:
        return self.seed if self.train_seed < 0 else self.train_seed


@dataclass
class Config(Section):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every setting, less a client's own secret (`defence.private_seed`), which is never written."""
        values = dataclasses.asdict(self)
        del values["defence"]["private_seed"]
        return values

    def defence_seed(self) -> int:
        """The seed of a client's own defence draws: its secret where it holds one, else run.seed."""
        return self.run.seed if self.defence.private_seed < 0 else self.defence.private_seed


def differing_keys(one: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The (section, key) pairs two configs as `Config.to_dict()` (or a config.toml) disagree on."""
    sections = sorted(set(one) | set(other))
    keys = [(s, k) for s in sections for k in sorted(set(one.get(s, {})) | set(other.get(s, {})))]
    return [(s, k) for s, k in keys if one.get(s, {}).get(k) != other.get(s, {}).get(k)]


def audits_privacy(config: Config) -> bool:
    """Whether a run ends with the attribute-privacy stage (audit, and any defence)."""
    defence = config.defence
    return config.audit.enabled or defence.method != "none" or defence.upload != "none" or defence.compare


CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("synthetic", "ml-100k", "ml-1m", "csv"),
    "model.name": tuple(MODELS),
    "model.loss": ("bpr", "bce"),
    "train.optimizer": ("sgd", "adam"),
    "train.server_optimizer": SERVER_OPTIMIZERS,
    "train.client_optimizer_state": ("fresh", "user"),
    "train.negative_sampler": ("uniform", "fru"),
    "train.aggregation": ("mean", "trimmed-mean", "median"),
    "run.engine": ("auto", "batched", "inprocess", "flower"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.mode": ("federated", "central", "popularity"),
    "eval.select": ("last", "best_valid"),
    "defence.method": ("none", *DEFENCES),
    "defence.upload": ("none", "ldp", "pseudo-items", "ldp+pseudo-items", "secagg"),
    "defence.pseudo_rows": ("trained", "gaussian", "mimic"),
    "defence.clients": ("all", "listed", "at-risk"),
    "defence.cloak_stop": ("null", "null-means", "steps"),
    "defence.cloak_balance": ("raw", "unit"),
    "defence.ldp_mechanism": ("gaussian", "laplace"),
    "unlearn.user_parts": ("reset", "keep"),
    "unlearn.history_dtype": ("int8", "float16", "float32"),
    "unlearn.method": tuple(METHODS),
}

POSITIVE = {
    "defence.secagg_min_clients",
    "data.test_negatives",
    "data.synthetic_users",
    "data.synthetic_items",
    "data.synthetic_interactions",
    "model.dim",
    "model.negatives",
    "model.init_std",
    "train.rounds",
    "train.local_epochs",
    "train.lr",
    "train.batch_size",
    "train.server_lr",
    "train.dense_server_lr",
    "train.server_optimizer_lr",
    "train.min_replies",
    "train.reply_timeout",
    "central.epochs",
    "central.lr",
    "central.batch_size",
    "eval.every",
    "run.num_cpus",
    "run.client_cpus",
    "unlearn.dt",
    "unlearn.r",
    "unlearn.lam",
    "unlearn.poison_boost",
    "defence.steps",
    "defence.lr",
    "defence.batch",
    "defence.ldp_clip",
    "defence.ldp_epsilon",
    "defence.secagg_bound",
}
NON_NEGATIVE = {
    "run.client_gpus",
    "data.min_rating",
    "data.synthetic_strength",
    "train.weight_decay",
    "train.reject_norm_ratio",
    "train.max_loss_growth",
    "train.clip_norm_ratio",
    "faults.share",
    "run.seed",
    "defence.weight",
    "defence.pseudo_items",
}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Turn a TOML or command-line value into the field's type, or say what is wrong."""
    origin = get_origin(kind)
    if origin is list:
        (inner,) = get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list):
            raise FedUnlearnError(f"{key} must be a list, e.g. {key}=[5,10,20]; got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise FedUnlearnError(f"{key} must be true or false; got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise FedUnlearnError(f"{key} must be a whole number; got {value!r}")
        try:
            return int(str(value).strip()) if not isinstance(value, float) else int(value)
        except ValueError:
            raise FedUnlearnError(f"{key} must be a whole number; got {value!r}") from None
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise FedUnlearnError(f"{key} must be a number; got {value!r}") from None
        if not math.isfinite(number):  # nan <= 0 is False: a NaN would pass every range check below
            raise FedUnlearnError(f"{key} must be a finite number; got {value!r}")
        return number
    return str(value)


def _section_types(section: Any) -> dict[str, Any]:
    return get_type_hints(type(section))


_SECTIONS = tuple(f.name for f in fields(Config))


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on the config, converting the value to the field's type."""
    section_name, _, key = dotted.partition(".")
    section = getattr(config, section_name, None) if section_name in _SECTIONS else None
    if section is None or not key:
        raise FedUnlearnError(
            f"unknown config key '{dotted}': keys look like section.key with section one of {', '.join(_SECTIONS)}"
        )
    types = _section_types(section)
    if key not in types:
        raise FedUnlearnError(f"unknown config key '{dotted}': {section_name} has {', '.join(types)}")
    setattr(section, key, _coerce(dotted, value, types[key]))


def validate(config: Config) -> Config:
    """Raise a one-line FedUnlearnError for the first invalid value."""
    for dotted, allowed in CHOICES.items():
        value = _get(config, dotted)
        if value not in allowed:
            raise FedUnlearnError(f"{dotted} = {value!r} is not valid: choose one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if _get(config, dotted) <= 0:
            raise FedUnlearnError(f"{dotted} must be > 0; got {_get(config, dotted)}")
    for dotted in NON_NEGATIVE:
        if _get(config, dotted) < 0:
            raise FedUnlearnError(f"{dotted} must be >= 0; got {_get(config, dotted)}")
    for dotted in (
        "unlearn.alpha",
        "unlearn.beta",
        "train.pool_share",
        "defence.ldp_delta",
        "defence.risk_threshold",
    ):
        if not 0 < _get(config, dotted) <= 1:
            raise FedUnlearnError(f"{dotted} must be in (0, 1]; got {_get(config, dotted)}")
    if not 0 < config.audit.shadow_share < 1:  # the attacker is tested on the users it was not trained on
        raise FedUnlearnError(f"audit.shadow_share must be in (0, 1), e.g. 0.2; got {config.audit.shadow_share}")
    if config.defence.private_seed != -1:
        raise FedUnlearnError("defence.private_seed is each client's own secret, never in a config: a SuperNode "
                              "takes it from --node-config noise-secret=N (docs/DEPLOYMENT.md); remove it")
    if config.run.train_seed < -1:
        raise FedUnlearnError(f"run.train_seed must be >= 0, or -1 for run.seed; got {config.run.train_seed}")
    if config.central.weight_decay < 0 and config.central.weight_decay != -1:
        raise FedUnlearnError("central.weight_decay must be >= 0, or -1 for train.weight_decay; "
                              f"got {config.central.weight_decay}")  # fmt: skip
    fraction = config.train.fraction
    if not 0 < fraction <= 1:
        raise FedUnlearnError(f"train.fraction must be in (0, 1]; got {fraction}")
    if not 0 <= config.train.trim < 0.5:
        raise FedUnlearnError(f"train.trim must be in [0, 0.5) (the share cut at each end); got {config.train.trim}")
    if config.faults.share > 1:
        raise FedUnlearnError(f"faults.share must be in [0, 1]; got {config.faults.share}")
    kinds = config.faults.kinds
    if not kinds or set(kinds) - set(FAULT_KINDS):
        raise FedUnlearnError(f"faults.kinds must name some of {', '.join(FAULT_KINDS)}; got {kinds}")
    if "timeout" in kinds and config.run.engine != "flower":
        raise FedUnlearnError("faults.kinds 'timeout' needs run.engine=flower (only Flower waits for replies)")
    if not config.eval.ks or any(k <= 0 for k in config.eval.ks) or len(set(config.eval.ks)) < len(config.eval.ks):
        raise FedUnlearnError(f"eval.ks must be distinct positive cut-offs, e.g. [5, 10, 20]; got {config.eval.ks}")
    if 10 not in config.eval.ks:
        raise FedUnlearnError(f"eval.ks must include 10 (HR@10 is the headline metric); got {config.eval.ks}")
    if max(config.eval.ks) > config.data.test_negatives + 1:
        raise FedUnlearnError(
            f"eval.ks has {max(config.eval.ks)} but only {config.data.test_negatives + 1} items are ranked: "
            "lower the cut-off or raise data.test_negatives"
        )
    if config.model.name == "ncf" and (not config.model.mlp_layers or min(config.model.mlp_layers) <= 0):
        raise FedUnlearnError(f"model.mlp_layers must be positive widths; got {config.model.mlp_layers}")
    unknown = sorted(set(config.audit.attackers) - set(ATTACKERS))
    if unknown or not config.audit.attackers:
        raise FedUnlearnError(f"audit.attackers must name some of {', '.join(ATTACKERS)}; got {config.audit.attackers}")
    if config.defence.upload != "none" and config.defence.clients == "at-risk":
        raise FedUnlearnError(
            "defence.clients = 'at-risk' applies to post-training defences; for defence.upload use all or listed"
        )
    if config.defence.trains_fake_items() and config.run.engine == "batched":
        raise FedUnlearnError("defence.pseudo_rows = 'trained' trains fake examples on the in-process and Flower "
                              "engines: use run.engine = 'auto', 'inprocess' or 'flower'")  # fmt: skip
    _validate_secure_aggregation(config)
    _validate_server_optimizer(config)
    _validate_client_optimizer_state(config)
    at_risk = config.defence.method != "none" and config.defence.clients == "at-risk"
    if config.run.engine == "flower" and not config.audit.enabled and (config.defence.compare or at_risk):
        needs = "defence.compare" if config.defence.compare else "defence.clients = 'at-risk'"
        raise FedUnlearnError(
            f"{needs} needs the audit's central view on the Flower engine: set audit.enabled = true "
            "(simulation only: the clients hand their embeddings to the auditor)"
        )
    if config.defence.clients == "listed" and not config.defence.client_ids:
        raise FedUnlearnError(
            "defence.clients = 'listed' needs defence.client_ids, e.g. --set defence.client_ids=[1,2]"
        )
    tenths = config.defence.risk_threshold * RISK_TENTHS
    if abs(tenths - round(tenths)) > 1e-9 or not 1 <= round(tenths) < RISK_TENTHS:
        raise FedUnlearnError(
            "defence.risk_threshold must be one of 0.1, 0.2, ..., 0.9 (the local audit's secure sum counts the "
            f"attacker's confidence in tenths: only these match the at-risk rule); got {config.defence.risk_threshold}"
        )
    weight = config.defence.cloak_weight
    if weight != -1 and not 0 <= weight <= 1:
        raise FedUnlearnError(f"defence.cloak_weight must be in [0, 1], or -1 for the min-norm weight; got {weight}")
    if config.train.aggregation != "mean" and (config.unlearn.method == "fru" or config.unlearn.compare):
        which = "unlearn.compare tries FRU, whose" if config.unlearn.method != "fru" else "unlearn.method = 'fru':"
        raise FedUnlearnError(
            f"{which} replay measures and takes the stored steps as plain means, not train.aggregation = "
            f"{config.train.aggregation!r}: use train.aggregation = 'mean' or another unlearning method"
        )
    if config.run.mode != "federated" and (config.unlearn.drop.strip() or config.unlearn.drop_random.strip()):
        mode = config.run.mode
        raise FedUnlearnError(f"a drop schedule needs run.mode = 'federated' (clients leave one), not {mode!r}")
    federated_only = {
        "unlearn.method": config.unlearn.method != "none", "unlearn.compare": config.unlearn.compare,
        "defence.method": config.defence.method != "none", "defence.compare": config.defence.compare,
        "defence.upload": config.defence.upload != "none", "audit.enabled": config.audit.enabled,
        "faults.share": config.faults.share > 0,
    }  # fmt: skip
    ignored = [key for key, set_away in federated_only.items() if set_away]
    if config.run.mode != "federated" and ignored:
        raise FedUnlearnError(f"{', '.join(ignored)} act on a federation: run.mode = {config.run.mode!r} would ignore "
                              "them; leave them at their defaults or use run.mode = 'federated'")  # fmt: skip
    if config.unlearn.attackers and not config.unlearn.poison:
        raise FedUnlearnError("unlearn.attackers is filled in from the drop schedule when unlearn.poison is on: "
                              "leave it empty and set unlearn.poison = true with a drop")  # fmt: skip
    if config.data.dataset == "csv" and not config.data.path:
        raise FedUnlearnError("data.dataset = 'csv' needs data.path: --set data.path=interactions.csv")
    config._freeze(True)
    return config


def _reading_stored_updates(unlearn: UnlearnConfig) -> tuple[str, str]:
    """How to name the configured unlearning when it reads single clients' stored updates (every
    method but none and retrain, and unlearn.compare, which tries them all), and the setting that
    stops it; ('', '') when it reads none."""
    if unlearn.compare:
        return f"unlearn.compare (with unlearn.method = {unlearn.method!r})", "unlearn.compare = false"
    if unlearn.method not in ("none", "retrain"):
        return f"unlearn.method = {unlearn.method!r}", "unlearn.method = 'retrain'"
    return "", ""


def _validate_server_optimizer(config: Config) -> None:
    """The calibration methods rebuild the model from stored client updates with the plain server
    step; an adaptive server optimizer's state is not in their history."""
    reader, fix = _reading_stored_updates(config.unlearn)
    if config.train.server_optimizer != "sgd" and reader:
        raise FedUnlearnError(
            f"{reader} replays stored updates with the plain server step, not train.server_optimizer = "
            f"{config.train.server_optimizer!r}: use {fix} or train.server_optimizer = 'sgd'"
        )


def _validate_client_optimizer_state(config: Config) -> None:
    """The user part's Adam state lives in the single-machine pools' client state (not in Flower's)."""
    if config.train.client_optimizer_state == "fresh":
        return
    if config.train.optimizer != "adam":
        raise FedUnlearnError("train.client_optimizer_state = 'user' keeps Adam's state: set train.optimizer = 'adam'")
    if config.run.engine == "flower":
        raise FedUnlearnError(
            "train.client_optimizer_state = 'user' runs on the batched and in-process engines: "
            "use run.engine = 'batched' or 'inprocess'"
        )


def _validate_secure_aggregation(config: Config) -> None:
    """Under secure aggregation the server sees only the sum of a round's uploads: whatever needs one
    client's upload cannot run (fl/secure_round.py)."""
    if config.defence.upload != "secagg":
        return
    if config.defence.clients != "all":
        raise FedUnlearnError("defence.upload = 'secagg' sums every client's upload: use defence.clients = 'all'")
    train = config.train
    reader, fix = _reading_stored_updates(config.unlearn)
    if reader:
        raise FedUnlearnError(
            f"{reader} reads single clients' stored updates, which secure aggregation (defence.upload = 'secagg') "
            f"never shows the server: use {fix} or another defence.upload"
        )
    if train.aggregation != "mean" or train.clip_norm_ratio > 0:
        raise FedUnlearnError(
            "train.aggregation (robust) and train.clip_norm_ratio act on single uploads, which secure aggregation "
            "(defence.upload = 'secagg') hides: use train.aggregation = 'mean' and train.clip_norm_ratio = 0"
        )
    if config.faults.share > 0:
        raise FedUnlearnError(
            "faults.share > 0 tests the server's checks of single uploads, which secure aggregation "
            "(defence.upload = 'secagg') hides: set faults.share = 0 or another defence.upload"
        )


def with_private_seed(config: Config, secret: int) -> Config:
    """The config on a client holding its own secret seed (`defence.private_seed`); nothing else changes."""
    if not 0 <= secret < 2**63:
        raise FedUnlearnError(f"noise-secret must be an integer in [0, 2**63); got {secret}")
    changed = copy.deepcopy(config)
    changed._freeze(False)
    changed.defence.private_seed = secret
    changed._freeze(True)
    return changed


def derive(config: Config, changes: dict[str, Any]) -> Config:
    """A validated, frozen copy of `config` with `section.key` values changed."""
    changed = copy.deepcopy(config)
    changed._freeze(False)
    for dotted, value in changes.items():
        set_value(changed, dotted, value)
    return validate(changed)


def _get(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then `key=value` overrides; validated."""
    config = Config()
    if path is not None:
        apply_mapping(config, read_toml(path))
    load_overrides(config, overrides or [])
    return validate(config)


def load_overrides(config: Config, overrides: list[str]) -> None:
    """Apply `section.key=value` strings (values parsed as TOML when they are TOML)."""
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise FedUnlearnError(f"--set expects key=value, e.g. --set train.rounds=10; got {item!r}")
        set_value(config, dotted.strip(), _parse_scalar(value.strip()))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FedUnlearnError(f"config file {path} not found: pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FedUnlearnError(f"{path} is not a UTF-8 text file: pass a TOML config") from None
    except tomllib.TOMLDecodeError as err:
        raise FedUnlearnError(f"{path} is not valid TOML: {err}") from None


def apply_mapping(config: Config, mapping: dict[str, Any], where: str = "settings") -> None:
    """Apply a nested ({section: {key: value}}) or dotted ({"section.key": value}) mapping."""
    if not isinstance(mapping, dict):
        raise FedUnlearnError(f"{where} must be a table of section.key = value; got {mapping!r}")
    for name, value in mapping.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                set_value(config, f"{name}.{key}", inner)
        else:
            set_value(config, name, value)


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value as TOML when it is one (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (used to ship the config to Flower apps)."""
    config = Config()
    apply_mapping(config, data)
    return validate(config)
