"""Faulty clients on demand (`[faults]`): a seeded share of the clients asked to train misbehave.

Which client misbehaves, and how, is a pure function of (seed, round, client id), so every engine
injects the same faults and a rerun injects them again. The fault is applied on the client side, to
the upload it has just computed: a corrupted or late upload leaves the client with its new user part
(as a device whose reply is lost or corrupted on the way), an `exception` leaves it with nothing of
the round (as a Flower client whose handler raises: its state is not saved). The server must catch
every kind (fedunlearn.fl.replies).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from fedunlearn.config import Config, FaultsConfig
from fedunlearn.fl.replies import FAILED, Reply
from fedunlearn.fl.updates import ClientUpdate
from fedunlearn.seeding import Stream, client_uniforms

HUGE = 1e6  # huge_norm: the rows are scaled by this (the kinds: config.FAULT_KINDS)


class ClientFault(RuntimeError):
    """The `exception` fault: the client fails instead of replying."""


def fault_of(faults: FaultsConfig, seed: int, round_number: int, client_id: str) -> str | None:
    """The fault this client injects in this round, if any: it misbehaves with probability `share`,
    and the kind is drawn uniformly from `kinds`."""
    if faults.share <= 0:
        return None
    draw = client_uniforms(seed, Stream.FAULTS, round_number, [client_id])[0]
    if draw >= faults.share:
        return None
    return faults.kinds[min(int(draw / faults.share * len(faults.kinds)), len(faults.kinds) - 1)]


def inject(
    faults: FaultsConfig, seed: int, round_number: int, update: ClientUpdate, client_ids: list[str], n_items: int,
    timeout: float,
) -> ClientUpdate:  # fmt: skip
    """The upload as the faulty client sends it (`client_ids`: the federation's, for a spoof); raises
    ClientFault for `exception`; sleeps past `timeout` for `timeout`."""
    kind = fault_of(faults, seed, round_number, update.client_id)
    if kind is None:
        return update
    if kind == "exception":
        raise ClientFault(f"injected fault: client {update.client_id} failed in round {round_number}")
    if kind == "timeout":
        time.sleep(timeout + 1)  # late for the round, in time for the next message
        return update
    if kind == "spoof_id":
        victim = client_ids[(client_ids.index(update.client_id) + 1) % len(client_ids)]
        return replace(update, client_id=victim)
    if kind == "item_range":
        item_ids = update.item_ids.copy()
        item_ids[-1] = n_items
        return replace(update, item_ids=item_ids)
    rows = {key: value.copy() for key, value in update.rows.items()}
    first = next(iter(rows))
    if kind in ("nan", "inf"):
        rows[first].flat[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        rows = {key: value[:, :-1] for key, value in rows.items()}
    elif kind == "huge_norm":
        rows = {key: value * HUGE for key, value in rows.items()}
    return replace(update, rows=rows)


def local_reply(
    config: Config, round_number: int, sender: int, update: ClientUpdate, client_ids: list[str], n_items: int
) -> Reply[ClientUpdate]:
    """What a single-machine pool gets back from client `sender` for the upload it computed: the
    upload, or the injected fault (an `exception` fault becomes a failed reply)."""
    try:
        faults, timeout = config.faults, config.train.reply_timeout
        return Reply(sender, inject(faults, config.run.seed, round_number, update, client_ids, n_items, timeout))
    except ClientFault as fault:
        return Reply(sender, failure=FAILED, detail=str(fault))
