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

OWED = "compaction_owed"  # a row here: deleted rows whose bytes a VACUUM has not yet removed


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
                self.compact()

    def vacuum(self) -> None:
        """Compact the file (deleted rows' bytes gone from disk) now, or after the open transaction.
        The transaction also records that a compaction is owed (`compaction_owed`): deleted rows stay
        as cells inside live pages until VACUUM rewrites the file, and a run killed before or during
        it must compact when it is opened again (the free-page count alone misses those cells)."""
        if not self.depth:
            self.compact()
            return
        if not self.vacuum_pending:
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {OWED} (owed INTEGER)")
            self.db.execute(f"INSERT INTO {OWED} VALUES (1)")
        self.vacuum_pending = True

    def compact(self) -> None:
        """VACUUM every file of this connection (an attached resume checkpoint included), then clear
        the record that a compaction was owed."""
        for _, schema, _ in self.db.execute("PRAGMA database_list").fetchall():
            if schema != "temp":
                self.db.execute(f"VACUUM {schema}")
        if self.compaction_owed():
            self.db.execute(f"DELETE FROM {OWED}")

    def compaction_owed(self) -> bool:
        """A compaction was recorded and has not finished, or free pages are left (a file of an
        earlier version, killed before its compaction)."""
        owed = self.db.execute(f"SELECT name FROM sqlite_master WHERE name = '{OWED}'").fetchone() is not None
        owed = owed and self.db.execute(f"SELECT COUNT(*) FROM {OWED}").fetchone()[0] > 0
        return owed or self.db.execute("PRAGMA freelist_count").fetchone()[0] > 0

    def close(self) -> None:
        self.db.close()
