"""A federation: the prepared dataset cut into one partition per client (user)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import numpy as np

from fedunlearn.config import DataConfig
from fedunlearn.data import Dataset, load_dataset
from fedunlearn.data.split import Split, leave_one_out
from fedunlearn.errors import FedUnlearnError


@dataclass(frozen=True)
class ClientData:
    """What one client holds on its device."""

    index: int  # position in the federation (Flower's partition id)
    client_id: str  # the dataset's user id: the stable key everywhere
    n_items: int
    train_items: np.ndarray
    valid_item: int
    test_item: int
    test_negatives: np.ndarray

    def unseen_mask(self) -> np.ndarray:
        """Items the test item is ranked against in full ranking: all but the user's own."""
        mask = np.ones(self.n_items, dtype=bool)
        mask[self.train_items] = False
        mask[[self.valid_item, self.test_item]] = False
        return mask


@dataclass(frozen=True)
class Federation:
    dataset: Dataset
    split: Split

    @property
    def n_clients(self) -> int:
        return self.split.n_users

    @property
    def n_items(self) -> int:
        return self.split.n_items

    @cached_property
    def client_ids(self) -> list[str]:
        """Built once: the in-process pool looks ids up per client, every round."""
        return [str(uid) for uid in self.dataset.user_ids]

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the clients and their partitions: a checkpoint resumes only on the data it was
        written with (a CSV grown or cut in between moved every index)."""
        split = self.split
        digest = hashlib.sha256(json.dumps([self.client_ids, self.n_items]).encode())
        for array in (split.train_indptr, split.train_items, split.valid_item, split.test_item, split.test_negatives):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def kept(self, excluded: Collection[str]) -> list[int]:
        """The positions of the clients not in data.exclude_clients, in order; an unknown id or an
        empty federation is refused."""
        unknown = set(excluded) - set(self.client_ids)
        if unknown:
            raise FedUnlearnError(f"data.exclude_clients names unknown clients {sorted(unknown)[:5]}")
        gone = set(excluded)
        kept = [i for i, client in enumerate(self.client_ids) if client not in gone]
        if not kept:
            raise FedUnlearnError("data.exclude_clients excludes every client: keep at least one to train and evaluate")
        return kept

    def client(self, index: int) -> ClientData:
        return ClientData(
            index=index,
            client_id=str(self.dataset.user_ids[index]),
            n_items=self.n_items,
            train_items=self.split.train_of(index),
            valid_item=int(self.split.valid_item[index]),
            test_item=int(self.split.test_item[index]),
            test_negatives=self.split.test_negatives[index],
        )


def build_federation(data: DataConfig, seed: int) -> Federation:
    dataset = load_dataset(
        data.dataset,
        path=data.path,
        users_path=data.users_path,
        min_rating=data.min_rating,
        synthetic={
            "n_users": data.synthetic_users,
            "n_items": data.synthetic_items,
            "interactions_per_user": data.synthetic_interactions,
            "strength": data.synthetic_strength,
        },
        seed=seed,
    )
    return Federation(dataset, leave_one_out(dataset, num_negatives=data.test_negatives, seed=seed))


@lru_cache(maxsize=4)
def _cached(data_json: str, seed: int, _files: tuple[tuple[int, int], ...]) -> Federation:
    return build_federation(DataConfig(**json.loads(data_json)), seed)


def cached_federation(data: DataConfig, seed: int) -> Federation:
    """The federation for this data config, built once per process (Flower clients share it), and
    again when a file it reads (data.path, data.users_path) changed since: an experiment resumed in
    the same process checks its finished runs' data against the file as it is now."""
    files = tuple((stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, filter(os.path.isfile, _paths(data))))
    return _cached(json.dumps(asdict(data), sort_keys=True), seed, files)


def _paths(data: DataConfig) -> list[str]:
    return [path for path in (data.path, data.users_path) if path]
