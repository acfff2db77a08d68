"""The server's history of client updates, in SQLite (one database per run), keyed by stable client id.

What is kept, and for whom:
- every round: who took part and with how many examples, and the norm of each participant's update
  for every shared tensor (FedEraser's calibration norms);
- at checkpoint rounds (every `checkpoint_every` rounds from round 1): the global shared parameters
  before the round, and each participant's full update (FedEraser, FedAccum);
- every round, when `compact` is on: each participant's update cut to the `alpha` share of its
  touched item rows that changed most (FRU's storage rule), dense layers whole.

Writes run in the server's transaction (fedunlearn.database): a round, or a drop event with the round
after it, is stored whole or not at all, together with the resume checkpoint.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedunlearn.config import UnlearnConfig
from fedunlearn.database import Database
from fedunlearn.federated import ClientUpdate
from fedunlearn.models import Arrays

FULL, COMPACT = "full", "compact"


class HistoryError(LookupError):
    """A lookup found nothing where the algorithm needs something: never silently fall back."""


def _blob(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def update_norms(update: ClientUpdate) -> dict[str, float]:
    """L2 norm of the update for each shared tensor (rows: over the touched rows)."""
    return {key: float(np.linalg.norm(value)) for key, value in {**update.rows, **update.dense}.items()}


def compact_update(update: ClientUpdate, alpha: float) -> ClientUpdate:
    """FRU's storage rule: keep the `alpha` share of touched rows whose change is largest."""
    if not update.rows or len(update.item_ids) == 0:
        return update
    row_norms = np.sqrt(sum((value.astype(np.float64) ** 2).sum(axis=1) for value in update.rows.values()))
    keep = max(1, int(np.ceil(alpha * len(update.item_ids))))
    chosen = np.sort(np.argsort(-row_norms, kind="stable")[:keep])
    return ClientUpdate(
        update.client_id,
        update.num_examples,
        update.item_ids[chosen],
        {key: value[chosen] for key, value in update.rows.items()},
        update.dense,
        update.loss,
    )


def _update_bytes(update: ClientUpdate) -> int:
    return (
        update.item_ids.nbytes
        + sum(v.nbytes for v in update.rows.values())
        + sum(v.nbytes for v in update.dense.values())
    )


@dataclass
class HistoryPolicy:
    checkpoint_every: int = 2  # FedEraser's dt
    checkpoints: bool = True  # keep the global parameters at checkpoint rounds
    full_updates: bool = True  # keep every participant's full update at checkpoint rounds
    compact: bool = False  # keep FRU's compact updates every round
    alpha: float = 0.5  # FRU: share of touched rows kept

    @classmethod
    def for_method(cls, unlearn: UnlearnConfig) -> HistoryPolicy:
        """Only what the chosen method reads (participation and norms are always kept); `compare`
        tries every method, so it keeps everything."""
        method, everything = unlearn.method, unlearn.compare
        return cls(
            checkpoint_every=unlearn.dt,
            checkpoints=everything or method in ("federaser", "accum", "fru"),
            full_updates=everything or method in ("federaser", "accum"),
            compact=everything or method == "fru",
            alpha=unlearn.alpha,
        )


class HistoryStore(Database):
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS participation (round INTEGER, client_id TEXT, num_examples INTEGER,
        PRIMARY KEY (round, client_id));
    CREATE TABLE IF NOT EXISTS norms (round INTEGER, client_id TEXT, tensor TEXT, norm REAL,
        PRIMARY KEY (round, client_id, tensor));
    CREATE TABLE IF NOT EXISTS checkpoints (round INTEGER, tensor TEXT, data BLOB, PRIMARY KEY (round, tensor));
    CREATE TABLE IF NOT EXISTS updates (round INTEGER, client_id TEXT, kind TEXT, num_examples INTEGER,
        item_ids BLOB, PRIMARY KEY (round, client_id, kind));
    CREATE TABLE IF NOT EXISTS update_tensors (round INTEGER, client_id TEXT, kind TEXT, tensor TEXT, data BLOB,
        PRIMARY KEY (round, client_id, kind, tensor));
    CREATE TABLE IF NOT EXISTS accounting (name TEXT PRIMARY KEY, bytes INTEGER);
    """

    def __init__(self, path: str | Path, policy: HistoryPolicy) -> None:
        super().__init__(path)
        self.path = Path(path)
        self.policy = policy
        with self.transaction():
            for statement in filter(str.strip, self.SCHEMA.split(";")):
                self.db.execute(statement)

    def copy_to(self, path: str | Path) -> HistoryStore:
        """An independent copy (for trying an unlearning method without touching this history),
        as committed: call it before the open transaction writes anything."""
        target = Database(path)
        self.db.backup(target.db, name="main")
        target.close()
        return HistoryStore(path, self.policy)

    def is_checkpoint(self, round_number: int) -> bool:
        return (round_number - 1) % self.policy.checkpoint_every == 0

    def record_round(self, round_number: int, shared_before: Arrays, updates: list[ClientUpdate]) -> None:
        """Everything the policy keeps about one round, in one transaction."""
        with self.transaction():
            for update in updates:
                self.db.execute(
                    "INSERT OR REPLACE INTO participation VALUES (?, ?, ?)",
                    (round_number, update.client_id, update.num_examples),
                )
                self._put_norms(round_number, update)
                self._put_kept(round_number, update)
            if self.policy.checkpoints and self.is_checkpoint(round_number):
                self.put_checkpoint(round_number, shared_before)
            full = sum(_update_bytes(u) for u in updates)
            self.db.execute(
                "INSERT INTO accounting VALUES ('every_full_update', ?) "
                "ON CONFLICT(name) DO UPDATE SET bytes = bytes + excluded.bytes",
                (full,),
            )

    def put_checkpoint(self, round_number: int, shared: Arrays) -> None:
        rows = [(round_number, key, _blob(value)) for key, value in shared.items()]
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", rows)

    def _put_norms(self, round_number: int, update: ClientUpdate) -> None:
        rows = [(round_number, update.client_id, key, norm) for key, norm in update_norms(update).items()]
        self.db.executemany("INSERT OR REPLACE INTO norms VALUES (?, ?, ?, ?)", rows)

    def _put_kept(self, round_number: int, update: ClientUpdate) -> None:
        """The forms of one update the policy keeps: full at checkpoint rounds, compact every round."""
        if self.policy.full_updates and self.is_checkpoint(round_number):
            self._put_update(round_number, FULL, update)
        if self.policy.compact:
            self._put_update(round_number, COMPACT, compact_update(update, self.policy.alpha))

    def replace_round_update(self, round_number: int, update: ClientUpdate) -> None:
        """A replayed update takes the place of the stored one, in every form kept, norms included."""
        with self.transaction():
            self._put_kept(round_number, update)
            self._put_norms(round_number, update)

    def _put_update(self, round_number: int, kind: str, update: ClientUpdate) -> None:
        key = (round_number, update.client_id, kind)
        self.db.execute(
            "INSERT OR REPLACE INTO updates VALUES (?, ?, ?, ?, ?)", (*key, update.num_examples, _blob(update.item_ids))
        )
        tensors = [(*key, f"rows.{name}", _blob(v)) for name, v in update.rows.items()]
        tensors += [(*key, f"dense.{name}", _blob(v)) for name, v in update.dense.items()]
        self.db.executemany("INSERT OR REPLACE INTO update_tensors VALUES (?, ?, ?, ?, ?)", tensors)

    def replace_update(self, round_number: int, kind: str, update: ClientUpdate) -> None:
        with self.transaction():
            self._put_update(round_number, kind, update)
            self._put_norms(round_number, update)

    # ---- reading -------------------------------------------------------------------------------

    def rounds(self) -> list[int]:
        return [r for (r,) in self.db.execute("SELECT DISTINCT round FROM participation ORDER BY round")]

    def checkpoint_rounds(self) -> list[int]:
        return [r for (r,) in self.db.execute("SELECT DISTINCT round FROM checkpoints ORDER BY round")]

    def participants(self, round_number: int) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT client_id, num_examples FROM participation WHERE round = ? ORDER BY client_id", (round_number,)
        )
        return dict(rows.fetchall())

    def norms(self, round_number: int, client_id: str) -> dict[str, float]:
        rows = self.db.execute(
            "SELECT tensor, norm FROM norms WHERE round = ? AND client_id = ?", (round_number, client_id)
        ).fetchall()
        if not rows:
            raise HistoryError(f"no stored update norms for client {client_id} at round {round_number}")
        return dict(rows)

    def checkpoint(self, round_number: int) -> Arrays:
        rows = self.db.execute("SELECT tensor, data FROM checkpoints WHERE round = ?", (round_number,)).fetchall()
        if not rows:
            raise HistoryError(f"no checkpoint stored for round {round_number}")
        return {key: _array(blob) for key, blob in rows}

    def update(self, round_number: int, client_id: str, kind: str = FULL) -> ClientUpdate:
        head = self.db.execute(
            "SELECT num_examples, item_ids FROM updates WHERE round = ? AND client_id = ? AND kind = ?",
            (round_number, client_id, kind),
        ).fetchone()
        if head is None:
            raise HistoryError(f"no stored {kind} update for client {client_id} at round {round_number}")
        tensors = self.db.execute(
            "SELECT tensor, data FROM update_tensors WHERE round = ? AND client_id = ? AND kind = ?",
            (round_number, client_id, kind),
        ).fetchall()
        rows = {name[5:]: _array(blob) for name, blob in tensors if name.startswith("rows.")}
        dense = {name[6:]: _array(blob) for name, blob in tensors if name.startswith("dense.")}
        return ClientUpdate(client_id, int(head[0]), _array(head[1]), rows, dense, 0.0)

    def client_ids(self) -> set[str]:
        """Every client id that appears anywhere in the history."""
        found: set[str] = set()
        for table in ("participation", "norms", "updates", "update_tensors"):
            found |= {c for (c,) in self.db.execute(f"SELECT DISTINCT client_id FROM {table}")}
        return found

    # ---- forgetting and accounting ---------------------------------------------------------------

    def forget(self, client_ids: list[str]) -> None:
        """Delete every row of these clients, then compact the file so their bytes are gone too
        (once the open transaction commits)."""
        with self.transaction():
            for table in ("participation", "norms", "updates", "update_tensors"):
                self.db.executemany(f"DELETE FROM {table} WHERE client_id = ?", [(c,) for c in client_ids])
        self.vacuum()

    def clear(self) -> None:
        """Drop every stored round (Retrain rewrites the history from round 1)."""
        with self.transaction():
            for table in ("participation", "norms", "checkpoints", "updates", "update_tensors"):
                self.db.execute(f"DELETE FROM {table}")

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes of stored arrays by kind, and what keeping every full update of every round would take."""
        one = lambda sql: int(self.db.execute(sql).fetchone()[0] or 0)  # noqa: E731
        kinds = {
            "checkpoints": one("SELECT SUM(LENGTH(data)) FROM checkpoints"),
            FULL: one("SELECT SUM(LENGTH(data)) FROM update_tensors WHERE kind = 'full'")
            + one("SELECT SUM(LENGTH(item_ids)) FROM updates WHERE kind = 'full'"),
            COMPACT: one("SELECT SUM(LENGTH(data)) FROM update_tensors WHERE kind = 'compact'")
            + one("SELECT SUM(LENGTH(item_ids)) FROM updates WHERE kind = 'compact'"),
            "norms": 8 * one("SELECT COUNT(*) FROM norms"),
        }
        kinds["total"] = sum(kinds.values())
        kinds["every_full_update"] = one("SELECT bytes FROM accounting WHERE name = 'every_full_update'")
        return kinds
