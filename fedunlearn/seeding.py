"""Every random draw comes from a generator keyed by (seed, purpose, ...): same config, same numbers,
whatever order clients run in and whichever engine runs them."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    SHARED_INIT = 1
    USER_INIT = 2
    CLIENT_TRAIN = 3
    SAMPLING = 4
    CENTRAL = 5
    POPULARITY = 6


def rng_for(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), *keys])
