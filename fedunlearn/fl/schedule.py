"""Drop schedules: which clients leave (and ask to be forgotten) before which round.

"12,57@20"        clients 12 and 57 leave before round 20 trains
"12@10;57,3@20"   several events
random "5%@20"    a seeded 5% of the federation's clients (at least one), drawn from those still
                  present (or "7@20": seven clients)
"""

from __future__ import annotations

import math
import re

from fedunlearn.errors import FedUnlearnError
from fedunlearn.seeding import Stream, client_uniforms

_EVENT = re.compile(r"^\s*([^@]+?)\s*@\s*(\d+)\s*$")
_RANDOM = re.compile(r"^\s*(\d+(?:\.\d+)?)(%?)\s*@\s*(\d+)\s*$")


def _check_round(round_number: int, rounds: int, text: str) -> None:
    if not 2 <= round_number <= rounds:
        raise FedUnlearnError(
            f"drop event '{text}' is at round {round_number}: use a round from 2 to train.rounds ({rounds})"
        )


def parse_drops(spec: str, client_ids: list[str], rounds: int) -> dict[int, list[str]]:
    """Parse `ids@round[;ids@round...]` into {round: [client ids]}, checking every id and round."""
    events: dict[int, list[str]] = {}
    known = set(client_ids)
    seen: set[str] = set()
    for text in filter(str.strip, spec.split(";")):
        match = _EVENT.match(text)
        if not match:
            raise FedUnlearnError(
                f"cannot read drop event '{text.strip()}': write client ids and a round, e.g. 12,57@20"
            )
        round_number = int(match.group(2))
        _check_round(round_number, rounds, text.strip())
        for client in (c.strip() for c in match.group(1).split(",")):
            if not client:
                raise FedUnlearnError(f"drop event '{text.strip()}' has an empty client id: e.g. 12,57@20")
            if client not in known:
                raise FedUnlearnError(f"drop event '{text.strip()}': no client '{client}' in this dataset")
            if client in seen:
                raise FedUnlearnError(f"client '{client}' is dropped twice: list each client in one event only")
            seen.add(client)
            events.setdefault(round_number, []).append(client)
    return events


def add_random_drops(
    spec: str, events: dict[int, list[str]], client_ids: list[str], rounds: int, seed: int
) -> dict[int, list[str]]:
    """Add `N%@round` or `N@round` events: clients drawn (seeded) from those not already leaving."""
    events = {r: list(c) for r, c in events.items()}
    for text in filter(str.strip, spec.split(";")):
        match = _RANDOM.match(text)
        if not match:
            raise FedUnlearnError(f"cannot read random drop '{text.strip()}': write e.g. 5%@20 or 7@20")
        amount, percent, round_number = float(match.group(1)), match.group(2), int(match.group(3))
        _check_round(round_number, rounds, text.strip())
        if amount <= 0:
            raise FedUnlearnError(f"random drop '{text.strip()}' drops nobody: give a count or share above 0")
        if not percent and not amount.is_integer():
            raise FedUnlearnError(f"random drop '{text.strip()}': a count of clients is a whole number (or use %)")
        leaving = {c for cs in events.values() for c in cs}
        candidates = [c for c in client_ids if c not in leaving]
        count = max(1, math.ceil(amount / 100 * len(client_ids))) if percent else int(amount)
        if count <= 0 or count > len(candidates):
            raise FedUnlearnError(f"random drop '{text.strip()}' asks for {count} of {len(candidates)} clients left")
        draws = client_uniforms(seed, Stream.DROPS, round_number, candidates)
        chosen = sorted(candidates[i] for i in draws.argsort(kind="stable")[:count])
        events.setdefault(round_number, []).extend(chosen)
    return events


def check_not_everyone(events: dict[int, list[str]], client_ids: list[str]) -> None:
    leaving = sum(len(c) for c in events.values())
    if leaving >= len(client_ids):
        raise FedUnlearnError(
            f"the drop schedule removes all {len(client_ids)} clients: keep at least one to train and evaluate"
        )


def build_schedule(drop: str, drop_random: str, client_ids: list[str], rounds: int, seed: int) -> dict[int, list[str]]:
    events = parse_drops(drop, client_ids, rounds)
    if drop_random.strip():
        events = add_random_drops(drop_random, events, client_ids, rounds, seed)
    check_not_everyone(events, client_ids)
    return dict(sorted(events.items()))
