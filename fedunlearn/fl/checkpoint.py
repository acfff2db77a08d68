"""The resume checkpoint: what a killed run needs to continue exactly where its last complete round
ended, in `resume.sqlite` in the staging folder.

When the run keeps a history, the checkpoint file is attached to the history's connection, so the
round's history writes and its checkpoint commit in one transaction (fedunlearn.fl.database): after a
kill the two always agree, and a drop event has either happened whole (calibrated history, the
leaving clients' rows deleted, their state gone) or not at all. Every random draw is keyed by
(seed, stream, round, client), so continuing from the checkpoint gives the numbers of a run that
was never interrupted.

Each round's state is a new row, and the rows of earlier rounds are deleted after it: replacing
one row in place made SQLite journal the old state's pages every round (5.1 of the demo's 57 MB
written); new rows go to pages the last round freed, which need no journal.
"""

from __future__ import annotations

import io
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.database import Database
from fedunlearn.models.base import Arrays

RESUME_FILE = "resume.sqlite"


class Checkpoint:
    def __init__(self, folder: Path, history: Database | None = None) -> None:
        path = Path(folder) / RESUME_FILE
        self.own = history is None
        if history is None:
            self.store, schema = Database(path), "main"
        else:
            history.db.execute("ATTACH DATABASE ? AS resume", (str(path),))
            self.store, schema = history, "resume"
            if history.db.execute("PRAGMA resume.freelist_count").fetchone()[0]:  # a run killed after a drop
                history.db.execute("VACUUM resume")  # event's commit: the removed clients' old state goes now
        self.table = f"{schema}.rounds"
        tables = {name for (name,) in self.store.db.execute(f"SELECT name FROM {schema}.sqlite_master")}
        if "state" in tables:  # the layout before 2026-12-05
            raise FedUnlearnError(
                f"{path} was written by an older fedunlearn: it cannot be continued; run again without --resume"
            )
        with self.store.transaction() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (round INTEGER PRIMARY KEY, arrays BLOB, meta BLOB)")

    def transaction(self) -> AbstractContextManager[Any]:
        return self.store.transaction()

    def save(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?)",
                (meta["round"], buffer.getvalue(), json.dumps(meta).encode()),
            )
            db.execute(f"DELETE FROM {self.table} WHERE round < ?", (meta["round"],))

    def load(self) -> tuple[Arrays, dict[str, Any]] | None:
        """The last saved state, or None when no round has completed."""
        last = self.store.db.execute(f"SELECT arrays, meta FROM {self.table} ORDER BY round DESC LIMIT 1").fetchone()
        if last is None:
            return None
        with np.load(io.BytesIO(last[0]), allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        return arrays, json.loads(last[1])

    def close(self) -> None:
        if self.own:
            self.store.close()


def prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{key}": value for key, value in arrays.items()}


def unprefixed(prefix: str, arrays: Arrays) -> Arrays:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in arrays.items() if key.startswith(prefix + "/")}
