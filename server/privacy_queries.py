"""The privacy stage's messages to the clients (the audit, AttrCloak, D2D-R and U2U-R, the end of
`defence.compare`), mixed into `server.pool.FlowerPool`, which carries them: its transport sends a
task (`_send`), a query answered with ids only (`_query`) or a secure sum over SecAgg+ (`_secure_sum`)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from clients.messages import (
    AUDIT_USERS,
    CLASS_SUMS,
    CLOAK_PRODUCTS,
    DEFENCE_END,
    DEFENCE_FINISH,
    DEFENCE_START,
    DEFENCE_STEP,
    FEATURE_SUMS,
    FOURTH_POWERS,
    LOCAL_AUDIT,
    REGULARISED_STEP,
    DefenceStart,
    array_field,
    decode_audit_user,
    encode_defence_start,
    encode_defence_step,
    encode_regularised_step,
    instruction,
    secure_task,
)
from fedunlearn.config import Config
from fedunlearn.fl.federation import cached_federation
from fedunlearn.fl.replies import Reply
from fedunlearn.models.base import Arrays
from fedunlearn.privacy.attacks import Attacker
from fedunlearn.privacy.attrcloak import AttributeGradient
from fedunlearn.privacy.common import unpack_class_sums
from fedunlearn.privacy.gaussian import ClassSums
from fedunlearn.privacy.portable import attacker_to_bytes

LeftOut = Mapping[str, Sequence[str]]  # per defended attribute, the values whose holders send zeros
CLASS_SUMS_BOUND = 128.0  # |e_i|, |e_i e_j| of every user embedding must stay below this
PRODUCTS_BOUND = 64.0  # AttrCloak: |g_R.g_R|, |g_AU.g_R|, |g_AU.g_AU| of every client must stay below this
FEATURE_SUMS_BOUND = 1.0  # D2D-R: a one-hot class and Fourier features, each within sqrt(2 / F) < 1


@dataclass(frozen=True)
class Draws:
    """Random cells of an attribute's class sums, one set per key: AttrCloak's null-level
    pseudo-classes (`shares`: the class shares they are drawn with, `attrcloak.null_labels`) or,
    with no shares, the covariance brake's (class, half) cells (`attrcloak.half_labels`)."""

    keys: tuple[int, ...]
    shares: tuple[float, ...] | None = None  # hashable: the counts of a draw are kept per Draws

    def fields(self) -> dict[str, Any]:
        keys = json.dumps([int(key) for key in self.keys])
        if self.shares is None:
            return {"split-keys": keys}
        return {"null-keys": keys, "null-shares": array_field(np.array(self.shares))}

    def cells(self, n_classes: int) -> int:
        return n_classes if self.shares is not None else 2 * n_classes


class PrivacyQueries(ABC):
    config: Config

    @abstractmethod
    def _send(
        self, kind: str, round_number: int, clients: list[int], shared: Arrays | None, done: Callable[[int], None]
    ) -> tuple[list[Message], list[Reply[Any]]]: ...

    @abstractmethod
    def _query(self, kind: str, contents: dict[int, RecordDict]) -> None: ...

    @abstractmethod
    def _secure_sum(self, clients: list[int], task: dict[str, Any], bound: float) -> np.ndarray: ...

    @abstractmethod
    def _by_sender(self, replies: list[Message], decode: Callable[[RecordDict], tuple[str, Any]], what: str
                   ) -> dict[str, Any]: ...  # fmt: skip

    def audit_users(self, clients: list[int]) -> list[Arrays]:
        """The simulation's measurement oracle, not part of the protocol: these clients' user parts,
        in the order of `clients`, for the attribute audit's central view (server.audit)."""
        replies, _ = self._send(AUDIT_USERS, 0, clients, None, lambda _: None)
        federation = cached_federation(self.config.data, self.config.run.seed)
        by_id = self._by_sender(replies, decode_audit_user, "audit")
        return [by_id[federation.client_ids[index]] for index in clients]

    def local_audit(self, attacker: Attacker, clients: list[int]) -> np.ndarray:
        """The sum over these clients of `fedunlearn.privacy.audit.local_outcome`, each run by the client on
        its own embedding and attribute, through SecAgg+. Counts, so rounded to whole numbers."""
        fields = {"attacker": attacker_to_bytes(attacker), "attribute": attacker.attribute}
        return np.rint(self._secure_sum(clients, secure_task(self.config, LOCAL_AUDIT, **fields), 1.0))

    def attribute_classes(self, attribute: str) -> list[str]:
        """The attribute's possible values, sorted (the dataset's schema, not any client's value)."""
        federation = cached_federation(self.config.data, self.config.run.seed)
        return sorted({str(value) for value in federation.dataset.attributes[attribute]})

    def class_counts(
        self, attribute: str, clients: list[int], classes: list[str], left_out: LeftOut | None = None,
        draws: Draws | None = None,
    ) -> np.ndarray:  # fmt: skip
        """How many of these clients are in each class (of each draw's cells: (keys, cells)),
        through SecAgg+ of one-hot rows alone: what the server learns before it asks for any sum
        of embeddings, to leave out the cells too small to sum (fedunlearn.privacy.cells)."""
        fields = _class_fields(attribute, classes, left_out, draws) | {"counts-only": True}
        total = self._secure_sum(clients, secure_task(self.config, CLASS_SUMS, **fields), 1.0)
        return np.rint(total).reshape(len(draws.keys) if draws is not None else 1, -1)

    def class_sums(
        self,
        attribute: str,
        clients: list[int],
        bound: float = CLASS_SUMS_BOUND,
        classes: list[str] | None = None,
        left_out: LeftOut | None = None,
        defence: bool = False,
    ) -> ClassSums:
        """AttrCloak's per-class sums (count, sum of e, sum of e e^T) over these clients' embeddings
        (`defence`: as defended so far), through SecAgg+; classes are `classes` or the attribute's
        sorted values, shipped to every client; a client holding a value `left_out` lists (of any
        attribute) sends zeros."""
        classes = classes if classes is not None else self.attribute_classes(attribute)
        fields = _class_fields(attribute, classes, left_out, None) | {"defence": defence}
        task = secure_task(self.config, CLASS_SUMS, **fields)
        return _class_sums(self._secure_sum(clients, task, bound), [len(classes)])[0]

    def cell_sums(
        self, attribute: str, clients: list[int], classes: list[str], left_out: LeftOut, draws: Draws,
        kept: np.ndarray, bound: float,
    ) -> list[ClassSums]:  # fmt: skip
        """AttrCloak's null level and covariance brake: for each of `draws`' keys the class sums of
        the defended embeddings under that draw's cells, all keys in one SecAgg+ sum; the members
        of a cell not `kept` (keys, cells) send zeros for that key."""
        fields = _class_fields(attribute, classes, left_out, draws) | {"defence": True}
        fields["kept-cells"] = json.dumps(np.asarray(kept, dtype=int).tolist())
        total = self._secure_sum(clients, secure_task(self.config, CLASS_SUMS, **fields), bound)
        return _class_sums(total, [draws.cells(len(classes))] * len(draws.keys))

    def defence_start(self, clients: list[int], start: DefenceStart, defending: list[bool] | None) -> None:
        """Each client notes its embedding and classes; `defending[i]`: whether clients[i] defends
        (None: each decides alone, from `start`'s attackers)."""
        flags = defending if defending is not None else [None] * len(clients)
        contents = {index: encode_defence_start(self.config, replace(start, defending=flag))
                    for index, flag in zip(clients, flags, strict=True)}  # fmt: skip
        self._query(DEFENCE_START, contents)

    def fourth_powers(
        self, attribute: str, classes: list[str], left_out: LeftOut, means: np.ndarray, global_mean: np.ndarray,
        clients: list[int], levels: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """The sum of each client's `fourth_power_contribution` (original embedding) split over
        `levels` (`attrcloak.split_into_levels`, flattened: (K + 1) x L shares), through SecAgg+."""
        fields = _class_fields(attribute, classes, left_out, None) | {"levels": array_field(levels)}
        fields |= {"means": array_field(means), "global-mean": array_field(global_mean)}
        return self._secure_sum(clients, secure_task(self.config, FOURTH_POWERS, **fields), 1.0)

    def cloak_products(
        self, step: int, variant: str, gradients: list[AttributeGradient], clients: list[int], bound: float
    ) -> np.ndarray:
        """Broadcast the attribute loss's gradients; the sum of each client's (g_R.g_R, g_AU.g_R,
        g_AU.g_AU) comes back through SecAgg+ (zero from a client that does not defend)."""
        fields: dict[str, Any] = {"step": step, "variant": variant, "attributes": len(gradients)}
        for j, (grad_sums, grad_outers) in enumerate(gradients):
            fields[f"grad-sums-{j}"] = array_field(grad_sums.numpy())
            fields[f"grad-outers-{j}"] = array_field(grad_outers.numpy())
        return self._secure_sum(clients, secure_task(self.config, CLOAK_PRODUCTS, **fields), bound)

    def defence_step(self, clients: list[int], weight: float, lr: float) -> None:
        content = encode_defence_step(self.config, weight, lr)
        self._query(DEFENCE_STEP, dict.fromkeys(clients, content))

    def defence_finish(self, clients: list[int]) -> None:
        self._query(DEFENCE_FINISH, dict.fromkeys(clients, instruction(self.config)))

    def feature_sums(
        self, attribute: str, classes: list[str], left_out: LeftOut, scale: float, seed: int,
        clients: list[int], bound: float,
    ) -> np.ndarray:  # fmt: skip
        """The sum of each client's D2D-R `feature_contribution` (embedding as defended so far),
        through SecAgg+; the clients build the Fourier features from (scale, seed)."""
        fields = _class_fields(attribute, classes, left_out, None) | {"scale": float(scale), "seed": seed}
        return self._secure_sum(clients, secure_task(self.config, FEATURE_SUMS, **fields), bound)

    def regularised_step(self, clients: list[int], method: str, gradients: list[tuple[np.ndarray, ...]],
                         weight: float, lr: float, n_clients: int, scale: float, seed: int) -> None:  # fmt: skip
        content = encode_regularised_step(self.config, method, gradients, weight, lr, n_clients, scale, seed)
        self._query(REGULARISED_STEP, dict.fromkeys(clients, content))

    def defence_end(self, clients: list[int], restore: bool) -> None:
        """After defence.compare: each client drops its trained user part, back to it first if `restore`."""
        content = instruction(self.config)
        content["defence"] = ConfigRecord({"restore": restore})
        self._query(DEFENCE_END, dict.fromkeys(clients, content))


def _class_fields(attribute: str, classes: list[str], left_out: LeftOut | None, draws: Draws | None
                  ) -> dict[str, Any]:  # fmt: skip
    """What every task over an attribute's classes ships: the attribute, the classes summed, per
    defended attribute the values whose holders send zeros (fedunlearn.privacy.cells), and any
    random draws."""
    left = {name: list(values) for name, values in (left_out or {}).items()}
    fields = {"attribute": attribute, "classes": json.dumps(classes), "left-out": json.dumps(left)}
    return fields | (draws.fields() if draws is not None else {})


def _class_sums(total: np.ndarray, class_counts: list[int]) -> list[ClassSums]:
    """Split a secure sum of concatenated class contributions (K_i classes each, K (1 + d + d^2)
    values) back into its class sums; counts rounded (they were summed as floats)."""
    dim = round((np.sqrt(4 * len(total) / sum(class_counts) - 3) - 1) / 2)
    out, start = [], 0
    for k in class_counts:
        length = k * (1 + dim + dim * dim)
        sums = unpack_class_sums(total[start : start + length], k, dim)
        out.append(ClassSums(np.rint(sums.counts), sums.sums, sums.outers))
        start += length
    return out
