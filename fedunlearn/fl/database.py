"""One SQLite connection with explicit, nestable transactions.

The server wraps a whole round, or a whole drop event with the round after it, in one
transaction: the history's writes and the resume checkpoint commit together or not at all, so a
run killed at any moment (kill -9 included) reopens on a consistent state. VACUUM cannot run
inside a transaction; it waits for the outermost commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Database:
    def __init__(self, path: str | Path) -> None:
        # the ServerApp may run in another thread than the one that opened the file
        # (run_simulation); it is only ever used by one thread at a time
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # deleted rows are not zeroed in place (some SQLite builds do, which doubled the bytes written
        # by clearing a 55 MB history to 110 MB): their bytes leave the file by VACUUM after the commit,
        # and a history opened with free pages left (a run killed before that) is compacted on opening
        self.db.execute("PRAGMA secure_delete = OFF")
        self.depth = 0
        self.vacuum_pending = False

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction, or part of the one already open: only the outermost commits (or rolls
        back, on any exception)."""
        if self.depth == 0:
            self.db.execute("BEGIN")
        self.depth += 1
        try:
            yield self.db
        except BaseException:
            self.depth -= 1
            if self.depth == 0 and self.db.in_transaction:  # SQLite may have rolled back itself (disk full)
                self.db.execute("ROLLBACK")
                self.vacuum_pending = False
            raise
        self.depth -= 1
        if self.depth == 0:
            self.db.execute("COMMIT")
            if self.vacuum_pending:
                self.vacuum_pending = False
                self.db.execute("VACUUM")

    def vacuum(self) -> None:
        """Compact the file (deleted rows' bytes gone from disk) now, or after the open transaction."""
        if self.depth:
            self.vacuum_pending = True
        else:
            self.db.execute("VACUUM")

    def close(self) -> None:
        self.db.close()
