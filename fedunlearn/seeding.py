"""Every random draw comes from a generator keyed by (seed, purpose, ...): same config, same numbers,
whatever order clients run in and whichever engine runs them.

Client draws are keyed by the stable client id, not by the client's position, so a run configured
without some clients gives every other client exactly the draws it gets in the full run: the
property that makes Retrain a faithful reference.
"""

from __future__ import annotations

import zlib
from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    SHARED_INIT = 1
    USER_INIT = 2
    CLIENT_TRAIN = 3
    SAMPLING = 4
    CENTRAL = 5
    # 6: the popularity ranker's tie-breaking jitter until 2026-12-07 (ties now count against the item)
    DROPS = 7
    DEFENCE = 8
    RETENTION = 9  # AttrCloak-DD: each client's minibatches for its retention loss, per defence step
    FAULTS = 10  # which clients misbehave in a round ([faults])
    NULL_LABELS = 11  # AttrCloak's null level: public random pseudo-classes, one set per attribute and draw
    HALVES = 12  # AttrCloak's covariance brake: public random halves of the clients, one per attribute and draw
    PSEUDO_ITEMS = 13  # trained pseudo-items: each client's fixed set of fake positives, one per run seed
    RETRAIN_DRAWS = 14  # Retrain under secure aggregation: the training seed of its replay, one per event
    SECURE_ROUNDING = 15  # SecAgg+'s stochastic rounding of a client's vector, per client and secure task


def rng_for(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), *keys])


def client_key(client_id: str) -> int:
    return zlib.crc32(client_id.encode())


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def client_uniforms(seed: int, stream: Stream, round_number: int, client_ids: list[str]) -> np.ndarray:
    """One uniform number in [0, 1) per client, a pure function of (seed, stream, round, client id)."""
    keys = np.array([client_key(c) for c in client_ids], dtype=np.uint64)
    mixed = (seed * 1_000_003 + int(stream) * 7919 + round_number) % 2**64  # a node's secret may reach 2**63
    salt = _splitmix64(np.array([mixed], dtype=np.uint64))
    return (_splitmix64(keys ^ salt) >> np.uint64(11)).astype(np.float64) / 2.0**53
