"""The batched engine: every client sampled in a round trains at once, as one tensor program.

Each client keeps its own plan (negatives, minibatches: `plan_local_training`), its own user part,
its own local copy of the rows it touches and of the dense layers, its own loss and its own Adam
state, exactly as on its device; only the arithmetic runs for all of them together. Their losses
are summed, and since no two clients share a parameter, each parameter's gradient is its own
client's. The result differs from the in-process runner only by the order of float sums.

Layout: clients are ordered by how many optimizer steps they take (most first), so at step s the
clients still training are a prefix; each client's copy of its touched rows is a contiguous block of
one (rows touched by all, d) table in the same order, so their rows are a prefix too. Client state
between rounds is one array per user table (no per-client objects).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from fedunlearn.config import Config
from fedunlearn.engines.batched_trainer import CHUNK_ELEMENTS, BatchedTrainer
from fedunlearn.engines.inprocess import LocalPool
from fedunlearn.fl.client import (
    UserMoments,
    candidates_of,
    finish_update,
    init_user,
    plan_local_training,
    ranks_from_scores,
)
from fedunlearn.fl.faults import local_reply
from fedunlearn.fl.federation import Federation
from fedunlearn.fl.replies import FAILED, Reply
from fedunlearn.fl.rounds import ProgressHook
from fedunlearn.fl.training import resolve_device
from fedunlearn.fl.updates import ClientEvaluation, ClientUpdate
from fedunlearn.models import build_model
from fedunlearn.models.base import Arrays


class BatchedPool(LocalPool):
    """The ClientPool of the batched engine. Private state: one (clients, d) array per user table."""

    def __init__(self, config: Config, federation: Federation) -> None:
        self.config = config
        self.federation = federation
        self.model = build_model(config.model, federation.n_items)
        self.device = resolve_device(config.run.device)
        self.trainer = BatchedTrainer(self.model, config, self.device)
        shapes = self.model.init_user(np.random.default_rng(0))
        self.users = {key: np.zeros((federation.n_clients, len(v)), np.float32) for key, v in shapes.items()}
        self.ready = np.zeros(federation.n_clients, dtype=bool)  # has a user part (initialised or trained)
        keeps_moments = config.train.client_optimizer_state == "user"  # every client's Adam state, one row each
        self.moments = UserMoments.zeros(shapes, (federation.n_clients,)) if keeps_moments else None
        # where training time goes, summed over calls (benchmarks/engines.py prints it)
        self.seconds = {"plans": 0.0, "tensors": 0.0, "uploads": 0.0}
        self.threads = config.run.num_cpus  # one program over every client's tensors: use the cores

    def _prepare(self, clients: list[int]) -> None:
        for index in clients:
            if not self.ready[index]:
                client_id = self.federation.client_ids[index]
                self.set_user(index, init_user(self.model, self.config.run.training_seed(), client_id))

    def user(self, index: int) -> Arrays:
        self._prepare([index])
        return {key: table[index].copy() for key, table in self.users.items()}

    def set_user(self, index: int, user: Arrays) -> None:
        for key, table in self.users.items():
            table[index] = user[key]
        self.ready[index] = True

    def _chunks(self, clients: list[int], sizes: Iterable[int]) -> Iterator[list[int]]:
        """Consecutive groups of clients whose tensors (`sizes`: floats per client) fit CHUNK_ELEMENTS."""
        chunk: list[int] = []
        total = 0
        for client, size in zip(clients, sizes, strict=True):
            if chunk and total + size > CHUNK_ELEMENTS:
                yield chunk
                chunk, total = [], 0
            chunk.append(client)
            total += size
        if chunk:
            yield chunk

    def train(
        self,
        round_number: int,
        clients: list[int],
        shared: Arrays,
        done: ProgressHook,
        epochs: float | None = None,
        ascent: bool = False,
        releases: Sequence[int] | None = None,
    ) -> list[Reply[ClientUpdate]]:
        started = time.perf_counter()
        release = dict(zip(clients, releases or [0] * len(clients), strict=True))
        self._prepare(clients)
        data = {index: self.federation.client(index) for index in clients}
        plans = {
            index: plan_local_training(
                self.model, data[index], self.user(index), shared, self.config, round_number, epochs
            )  # fmt: skip
            for index in clients
        }
        ordered = sorted(clients, key=lambda index: -len(plans[index].batches))
        dim = sum(table.shape[1] for table in self.users.values())
        dense_size = sum(shared[key].size for key in self.model.dense_keys(shared))
        sizes = (len(plans[index].touched) * dim + dense_size for index in ordered)
        updates = []
        self.seconds["plans"] += time.perf_counter() - started
        for chunk in self._chunks(ordered, sizes):
            chunk_plans = [plans[index] for index in chunk]
            users = {key: table[chunk] for key, table in self.users.items()}
            moments = None if self.moments is None or ascent else self.moments.rows(chunk)
            started = time.perf_counter()
            new_users, row_changes, dense_changes, losses = self.trainer.train(
                chunk_plans, users, shared, ascent, moments
            )  # fmt: skip
            self.seconds["tensors"] += time.perf_counter() - started
            started = time.perf_counter()
            ids, n_items = self.federation.client_ids, self.federation.n_items
            replies = []
            for c, index in enumerate(chunk):
                update = finish_update(data[index], plans[index], row_changes[c], dense_changes[c], float(losses[c]),
                                       self.config, round_number, ascent, release[index])  # fmt: skip
                replies.append(local_reply(self.config, round_number, index, update, ids, n_items))
            kept = [c for c, reply in enumerate(replies) if reply.failure != FAILED]  # a crashed client keeps nothing
            for key, table in new_users.items():
                self.users[key][[chunk[c] for c in kept]] = table[kept]
            if moments is not None and self.moments is not None:
                self.moments.set_rows([chunk[c] for c in kept], moments.rows(kept))
            updates += replies
            self.seconds["uploads"] += time.perf_counter() - started
            done(len(chunk))
        return updates

    @torch.no_grad()
    def _scores(self, clients: list[int], items: np.ndarray, shared: Arrays) -> np.ndarray:
        """(C, L) scores of each client's own L items (`items` is (C, L) or (L,) for all)."""
        device = self.device
        user = {key: torch.tensor(table[clients], device=device).unsqueeze(1) for key, table in self.users.items()}
        index = torch.as_tensor(items, device=device)
        rows = {key: torch.tensor(shared[key], device=device)[index] for key in self.model.row_keys}
        if index.ndim == 1:
            rows = {key: value.expand(len(clients), *value.shape) for key, value in rows.items()}
        dense = {key: torch.tensor(shared[key], device=device) for key in self.model.dense_keys(shared)}
        return self.model.score(user, rows, dense).cpu().numpy()

    def evaluate(self, clients: list[int], shared: Arrays, done: ProgressHook) -> list[Reply[ClientEvaluation]]:
        if not clients:
            return []
        self._prepare(clients)
        full_ranking, target = self.config.eval.full_ranking, self.config.unlearn.target_item
        scores_all = full_ranking or target >= 0
        width = self.model.n_items if scores_all else len(candidates_of(self.federation.client(clients[0])))
        results = []
        for chunk in self._chunks(clients, (width * self.model.dim for _ in clients)):
            data = [self.federation.client(index) for index in chunk]
            candidate_scores = self._scores(chunk, np.stack([candidates_of(d) for d in data]), shared)
            everything = self._scores(chunk, np.arange(self.model.n_items), shared) if scores_all else None
            for c, client in enumerate(data):
                row = None if everything is None else everything[c]
                ranks = ranks_from_scores(client, candidate_scores[c], row, full_ranking, target)
                results.append(Reply(chunk[c], ranks))
            done(len(chunk))
        return results

    def state(self) -> Arrays:
        """Every client's private state, for the resume checkpoint."""
        state = {f"user.{key}": table for key, table in self.users.items()} | {"ready": self.ready}
        return state | ({} if self.moments is None else self.moments.as_state())

    def load_state(self, state: Arrays) -> None:
        self.users = {key[5:]: value.copy() for key, value in state.items() if key.startswith("user.")}
        self.ready = state["ready"].copy()
        if self.moments is not None:
            self.moments = UserMoments.from_state(state, self.users)

    def fork(self) -> BatchedPool:
        """A copy whose clients' private state can change without touching this pool's."""
        twin = object.__new__(BatchedPool)
        twin.__dict__ |= self.__dict__
        twin.users = {key: table.copy() for key, table in self.users.items()}
        twin.ready = self.ready.copy()
        twin.moments = None if self.moments is None else self.moments.rows(slice(None))
        return twin

    def forget(self, clients: list[int]) -> None:
        """Delete these clients' private state (a later call starts them afresh)."""
        for table in self.users.values():
            table[clients] = 0
        self.ready[clients] = False
        if self.moments is not None:
            self.moments.clear(clients)
