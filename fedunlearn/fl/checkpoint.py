"""The resume checkpoint: what a killed run needs to continue exactly where its last complete round
ended, in `resume.sqlite` in the staging folder.

When the run keeps a history, the checkpoint file is attached to the history's connection, so the
round's history writes and its checkpoint commit in one transaction (fedunlearn.fl.database): after a
kill the two always agree, and a drop event has either happened whole (calibrated history, the
leaving clients' rows deleted, their state gone) or not at all. Every random draw is keyed by
(seed, stream, round, client), so continuing from the checkpoint gives the numbers of a run that
was never interrupted.
"""

from __future__ import annotations

import io
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.fl.database import Database
from fedunlearn.models.base import Arrays

RESUME_FILE = "resume.sqlite"


class Checkpoint:
    def __init__(self, folder: Path, history: Database | None = None) -> None:
        path = Path(folder) / RESUME_FILE
        self.own = history is None
        if history is None:
            self.store, self.table = Database(path), "state"
        else:
            history.db.execute("ATTACH DATABASE ? AS resume", (str(path),))
            self.store, self.table = history, "resume.state"
        with self.store.transaction() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (name TEXT PRIMARY KEY, data BLOB)")

    def transaction(self) -> AbstractContextManager[Any]:
        return self.store.transaction()

    def save(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with self.transaction() as db:
            rows = [("arrays", buffer.getvalue()), ("meta", json.dumps(meta).encode())]
            db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?)", rows)

    def load(self) -> tuple[Arrays, dict[str, Any]] | None:
        """The last saved state, or None when no round has completed."""
        rows = dict(self.store.db.execute(f"SELECT name, data FROM {self.table}").fetchall())
        if "meta" not in rows:
            return None
        with np.load(io.BytesIO(rows["arrays"]), allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        return arrays, json.loads(rows["meta"])

    def close(self) -> None:
        if self.own:
            self.store.close()


def prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{key}": value for key, value in arrays.items()}


def unprefixed(prefix: str, arrays: Arrays) -> Arrays:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in arrays.items() if key.startswith(prefix + "/")}
