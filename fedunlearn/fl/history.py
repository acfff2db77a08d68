"""The server's history of client updates, in SQLite (one database per run), keyed by stable client id.

What is kept, and for whom:
- every round: who took part and with how many examples, and the step size of each participant's
  update for every shared tensor (fl.updates.step_size: per row for item tables; FedEraser's
  calibration targets, gradient ascent's radius);
- at checkpoint rounds (every `checkpoint_every` rounds from round 1): the global shared parameters
  before the round, and each participant's full update: at every checkpoint for FedAccum (it applies
  them all), at the first only for FedEraser (it applies the first checkpoint's updates and reads
  only the step sizes of the later ones);
- every round, when `compact` is on: each participant's update cut to the `alpha` share of its
  touched item rows that changed most (FRU's storage rule), dense layers whole, with the ids of
  every row it touched (what the row-wise mean divides by).

Storage: one row per round and kind holds every client's update of that round (ids, example
counts, row offsets, and one raw array per tensor: item rows concatenated, dense layers stacked),
in `policy.dtype` (int8 with one float32 scale per row by default: a quarter of the bytes;
checkpoints stay float32), the item ids as one bitmap row per client where that is smaller (a fifth
of the uint16 ids on the demo), so a round is written and read with one query each and decoded with
`np.frombuffer`.

Writes run in the server's transaction (fedunlearn.fl.database): a round, or a drop event with the round
after it, is stored whole or not at all, together with the resume checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedunlearn.errors import FedUnlearnError
from fedunlearn.fl.aggregation import PackedUpdates
from fedunlearn.fl.database import Database
from fedunlearn.fl.updates import ClientUpdate, step_sizes
from fedunlearn.models.base import Arrays

FULL, COMPACT = "full", "compact"


class HistoryError(LookupError):
    """A lookup found nothing where the algorithm needs something: never silently fall back."""


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
    full_updates: str = "every"  # participants' full updates: at "every" checkpoint, the "first" only, or "none"
    compact: bool = False  # keep FRU's compact updates every round
    alpha: float = 0.5  # FRU: share of touched rows kept
    dtype: str = "int8"  # stored update tensors (checkpoints are always float32)


def _raw(array: np.ndarray) -> tuple[str, str, bytes]:
    array = np.ascontiguousarray(array)
    return array.dtype.str, json.dumps(array.shape), array.tobytes()


def _from_raw(dtype: str, shape: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))


def _encoded(name: str, value: np.ndarray, dtype: str) -> list[tuple[str, np.ndarray]]:
    """A stored tensor in `dtype`; int8 keeps one float32 scale per row (per client for dense layers,
    whose first axis is the client), max |value| / 127, stored beside it as `<name>.scale`."""
    if dtype != "int8":
        with np.errstate(over="ignore"):  # checked below, with a message that names the fix
            stored = value.astype(dtype)
        if not np.all(np.isfinite(stored)):  # float16 ends at 65504: the cast would store inf
            raise FedUnlearnError(
                f"a stored update of {name} lies beyond {dtype}'s range (largest |value| "
                f"{float(np.abs(value).max()):.3g}): use unlearn.history_dtype = 'int8' or 'float32'"
            )
        return [(name, stored)]
    axes = tuple(range(1, value.ndim))
    scale = np.abs(value).max(axis=axes, keepdims=True) / 127.0 if value.size else np.ones((0,) + (1,) * len(axes))
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    # clipped: a subnormal scale rounds down in float32, and the quotient may pass 127 and wrap
    return [(name, np.clip(np.round(value / scale), -127, 127).astype(np.int8)), (f"{name}.scale", scale)]


def _encoded_ids(name: str, ids: np.ndarray, offsets: np.ndarray) -> tuple[str, np.ndarray]:
    """A round's item ids (client i's are ids[offsets[i]:offsets[i + 1]]) as one bitmap row per client
    (`<name>.bitmap`, np.packbits) where every client's ids rise strictly and the bitmap is smaller,
    else in the narrowest unsigned type (uint16 for catalogues up to 65,536); both are exact."""
    narrow = ids.astype(np.min_scalar_type(int(ids.max()) if len(ids) else 0))
    lengths = np.diff(offsets)
    width = (int(ids.max()) + 8) // 8 if len(ids) else 0
    boundaries = offsets[1:-1][(offsets[1:-1] > 0) & (offsets[1:-1] < len(ids))] - 1
    rising = np.diff(ids) > 0
    rising[boundaries] = True
    if not len(ids) or not rising.all() or len(lengths) * width >= narrow.nbytes:
        return name, narrow
    bits = np.zeros((len(lengths), 8 * width), dtype=bool)
    bits[np.repeat(np.arange(len(lengths)), lengths), ids] = True
    return f"{name}.bitmap", np.packbits(bits, axis=1)


def _decoded_ids(arrays: Arrays, name: str, offsets: np.ndarray) -> np.ndarray:
    """The ids `_encoded_ids` stored, as int64."""
    if f"{name}.bitmap" not in arrays:
        return arrays[name].astype(np.int64)
    bits = np.unpackbits(arrays[f"{name}.bitmap"], axis=1).view(bool)
    lengths = np.diff(offsets)
    if not np.array_equal(np.count_nonzero(bits, axis=1), lengths):
        raise HistoryError(f"the stored {name} bitmap does not match the stored row counts: the history is damaged")
    # positions in the flattened (clients, catalogue) bitmap, less each client's row start: a
    # sixth of np.nonzero's time, whose second index array nothing reads
    return np.flatnonzero(bits) - np.repeat(np.arange(len(lengths)) * bits.shape[1], lengths)


def _decoded(arrays: Arrays) -> Arrays:
    """The stored tensors back in float32 (int8 ones times their scales)."""
    return {
        name: np.multiply(value, arrays[f"{name}.scale"], dtype=np.float32) if f"{name}.scale" in arrays else value
        for name, value in arrays.items()
        if not name.endswith(".scale")
    }


class HistoryStore(Database):
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS participation (round INTEGER, client_id TEXT, num_examples INTEGER,
        PRIMARY KEY (round, client_id));
    CREATE TABLE IF NOT EXISTS sizes (round INTEGER, client_id TEXT, tensor TEXT, size REAL,
        PRIMARY KEY (round, client_id, tensor));
    CREATE TABLE IF NOT EXISTS checkpoints (round INTEGER, tensor TEXT, dtype TEXT, shape TEXT, data BLOB,
        PRIMARY KEY (round, tensor));
    CREATE TABLE IF NOT EXISTS round_updates (round INTEGER, kind TEXT, clients TEXT, num_examples BLOB,
        offsets BLOB, touched_offsets BLOB, PRIMARY KEY (round, kind));
    CREATE TABLE IF NOT EXISTS round_tensors (round INTEGER, kind TEXT, tensor TEXT, dtype TEXT, shape TEXT,
        data BLOB, PRIMARY KEY (round, kind, tensor));
    CREATE TABLE IF NOT EXISTS accounting (name TEXT PRIMARY KEY, bytes INTEGER);
    """
    INDEX_ARRAYS = ("num_examples", "offsets", "touched_offsets")  # int64, one entry per client
    ID_ARRAYS = {"item_ids": "offsets", "touched": "touched_offsets"}  # stored by _encoded_ids, with their offsets

    def __init__(self, path: str | Path, policy: HistoryPolicy) -> None:
        super().__init__(path)
        self.path = Path(path)
        self.policy = policy
        self._cache: dict[tuple[int, str], PackedUpdates] = {}  # rounds read since the last write
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(round_updates)")}
        if tables & {"norms", "update_tensors"} or "item_ids" in columns:  # an earlier layout
            raise FedUnlearnError(
                f"{self.path} was written by an older fedunlearn (another history layout): "
                "it cannot be continued; run again without --resume"
            )
        with self.transaction():
            for statement in filter(str.strip, self.SCHEMA.split(";")):
                self.db.execute(statement)
        if self.compaction_owed():  # a run killed before or during its compaction: deleted rows' bytes go now
            self.compact()

    def copy_in_memory(self) -> HistoryStore:
        """An independent copy (for trying an unlearning method without touching this history), as
        committed: call it before the open transaction writes anything. In memory, never on disk:
        a file copy outlived a killed run (kill -9 skips a temporary folder's clean-up) and kept the
        leaving clients' stored updates there after the run had erased them."""
        twin = HistoryStore(":memory:", self.policy)
        self.db.backup(twin.db, name="main")
        return twin

    def is_checkpoint(self, round_number: int) -> bool:
        return (round_number - 1) % self.policy.checkpoint_every == 0

    def keeps_full_updates(self, round_number: int) -> bool:
        wanted = {"every": self.is_checkpoint(round_number), "first": round_number == 1, "none": False}
        return wanted[self.policy.full_updates]

    def record_round(self, round_number: int, shared_before: Arrays, updates: list[ClientUpdate]) -> None:
        """Everything the policy keeps about one round, in one transaction."""
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO participation VALUES (?, ?, ?)",
                [(round_number, u.client_id, u.num_examples) for u in updates],
            )
            self._put_sizes(round_number, updates)
            self._put_kept(round_number, updates)
            if self.policy.checkpoints and self.is_checkpoint(round_number):
                self.put_checkpoint(round_number, shared_before)
            full = sum(_update_bytes(u) for u in updates)
            self.db.execute(
                "INSERT INTO accounting VALUES ('every_full_update', ?) "
                "ON CONFLICT(name) DO UPDATE SET bytes = bytes + excluded.bytes",
                (full,),
            )

    def record_participation(self, round_number: int, client_ids: list[str]) -> None:
        """A round aggregated securely (fl/secure_round.py): the server knows who took part, not what
        any of them sent, nor how many examples (stored as NULL)."""
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO participation VALUES (?, ?, NULL)", [(round_number, c) for c in client_ids]
            )

    def put_checkpoint(self, round_number: int, shared: Arrays) -> None:
        rows = [(round_number, key, *_raw(value.astype(np.float32))) for key, value in shared.items()]
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)", rows)

    def _put_sizes(self, round_number: int, updates: list[ClientUpdate]) -> None:
        rows = [(round_number, u.client_id, key, size) for u in updates for key, size in step_sizes(u).items()]
        self.db.executemany("INSERT OR REPLACE INTO sizes VALUES (?, ?, ?, ?)", rows)

    def _put_kept(self, round_number: int, updates: list[ClientUpdate], replacing: bool = False) -> None:
        """The forms of a round's updates the policy keeps: full at checkpoint rounds, compact every
        round (with every row each client touched). `replacing`: these take the place of the same
        clients' stored updates, the others' stay."""
        packed = PackedUpdates.pack(updates)
        forms: list[tuple[str, PackedUpdates]] = []
        full = self.keeps_full_updates(round_number)
        if full:
            forms.append((FULL, packed))
        if self.policy.compact and not full:  # at a full round the compact form is read off the full one
            forms.append((COMPACT, self._as_stored(packed).compacted(self.policy.alpha)))
        for kind, kept in forms:
            if replacing:
                mine = set(kept.clients)
                others = [pair for pair in self._round(round_number, kind).all() if pair[0].client_id not in mine]
                pairs = [*kept.all(), *others]
                kept = PackedUpdates.pack([u for u, _ in pairs], [t for _, t in pairs])
            self._put_round(round_number, kind, kept)

    def _as_stored(self, packed: PackedUpdates) -> PackedUpdates:
        """The row changes as the history gives them back (through `policy.dtype`): FRU picks its
        rows on these, so a compact form stored alone and one read off a stored full form agree."""
        dtype = self.policy.dtype
        rows = {name: _decoded(dict(_encoded(name, value, dtype)))[name] for name, value in packed.rows.items()}
        return replace(packed, rows=rows)

    def _put_round(self, round_number: int, kind: str, packed: PackedUpdates) -> None:
        self._cache.pop((round_number, kind), None)
        key = (round_number, kind)
        index = [np.ascontiguousarray(getattr(packed, name)).tobytes() for name in self.INDEX_ARRAYS]
        self.db.execute(
            "INSERT OR REPLACE INTO round_updates VALUES (?, ?, ?, ?, ?, ?)",
            (*key, json.dumps(packed.clients), *index),
        )
        arrays = {f"rows.{name}": v for name, v in packed.rows.items()}
        arrays |= {f"dense.{name}": v for name, v in packed.dense.items()}
        encoded = [pair for name, value in arrays.items() for pair in _encoded(name, value, self.policy.dtype)]
        encoded += [
            _encoded_ids(f"ids.{name}", getattr(packed, name), getattr(packed, offsets))
            for name, offsets in self.ID_ARRAYS.items()
        ]
        tensors = [(*key, name, *_raw(value)) for name, value in encoded]
        self.db.execute("DELETE FROM round_tensors WHERE round = ? AND kind = ?", key)
        self.db.executemany("INSERT INTO round_tensors VALUES (?, ?, ?, ?, ?, ?)", tensors)

    def replace_updates(self, round_number: int, updates: list[ClientUpdate]) -> None:
        """New updates of some of a round's clients (a calibration, a replay) take the place of the
        stored ones, in every form the policy keeps, sizes included."""
        with self.transaction():
            self._put_kept(round_number, updates, replacing=True)
            self._put_sizes(round_number, updates)

    def drop_from_round(self, round_number: int, client_ids: list[str]) -> None:
        """Remove these clients from one stored round: a calibration or replay whose reply from them
        was rejected leaves no new update, and the old one was trained on the model being erased."""
        if not client_ids:
            return
        dropping = set(client_ids)
        with self.transaction():
            for table in ("participation", "sizes"):
                self.db.executemany(
                    f"DELETE FROM {table} WHERE round = ? AND client_id = ?", [(round_number, c) for c in client_ids]
                )
            for kind, clients in self.db.execute(
                "SELECT kind, clients FROM round_updates WHERE round = ?", (round_number,)
            ).fetchall():
                if dropping & set(json.loads(clients)):
                    self._repack_without(round_number, kind, dropping)

    def _repack_without(self, round_number: int, kind: str, dropping: set[str]) -> None:
        """Store one round's updates again without these clients."""
        pairs = [p for p in self._round(round_number, kind).all() if p[0].client_id not in dropping]
        self._put_round(round_number, kind, PackedUpdates.pack([u for u, _ in pairs], [t for _, t in pairs]))

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

    def sizes(self, round_number: int, client_id: str) -> dict[str, float]:
        """The step size (fl.updates.step_size) of the client's update of that round, per shared tensor."""
        rows = self.db.execute(
            "SELECT tensor, size FROM sizes WHERE round = ? AND client_id = ?", (round_number, client_id)
        ).fetchall()
        if not rows:
            raise HistoryError(f"no stored update sizes for client {client_id} at round {round_number}")
        return dict(rows)

    def round_sizes(self, round_number: int) -> dict[str, dict[str, float]]:
        """sizes() of every client of that round, in one query."""
        found: dict[str, dict[str, float]] = {}
        for client, tensor, size in self.db.execute(
            "SELECT client_id, tensor, size FROM sizes WHERE round = ?", (round_number,)
        ):
            found.setdefault(client, {})[tensor] = size
        return found

    def checkpoint(self, round_number: int) -> Arrays:
        rows = self.db.execute(
            "SELECT tensor, dtype, shape, data FROM checkpoints WHERE round = ?", (round_number,)
        ).fetchall()
        if not rows:
            raise HistoryError(f"no checkpoint stored for round {round_number}")
        return {key: _from_raw(dtype, shape, data).copy() for key, dtype, shape, data in rows}

    def _round(self, round_number: int, kind: str) -> PackedUpdates:
        cached = self._cache.get((round_number, kind))
        if cached is not None:
            return cached
        head = self.db.execute(
            "SELECT clients, num_examples, offsets, touched_offsets FROM round_updates "
            "WHERE round = ? AND kind = ?",
            (round_number, kind),
        ).fetchone()
        if head is None:
            if kind == COMPACT and self.policy.compact and self.keeps_full_updates(round_number):
                derived = self._round(round_number, FULL).compacted(self.policy.alpha)  # not stored twice
                self._cache = {(round_number, kind): derived}
                return derived
            return PackedUpdates.pack([], [])
        num_examples, offsets, touched_offsets = (np.frombuffer(blob, dtype=np.int64) for blob in head[1:])
        tensors = self.db.execute(
            "SELECT tensor, dtype, shape, data FROM round_tensors WHERE round = ? AND kind = ?", (round_number, kind)
        ).fetchall()
        arrays = _decoded({name: _from_raw(dtype, shape, data) for name, dtype, shape, data in tensors})
        item_ids = _decoded_ids(arrays, "ids.item_ids", offsets)
        touched = _decoded_ids(arrays, "ids.touched", touched_offsets)
        decoded = PackedUpdates(
            json.loads(head[0]), num_examples, offsets, item_ids, touched_offsets, touched,
            {name[5:]: v for name, v in arrays.items() if name.startswith("rows.")},
            {name[6:]: v for name, v in arrays.items() if name.startswith("dense.")},
        )  # fmt: skip
        self._cache = {(round_number, kind): decoded}  # one round at a time: the methods walk rounds in order
        return decoded

    def updates(self, round_number: int, client_ids: list[str], kind: str = FULL) -> list[ClientUpdate]:
        return [pair[0] for pair in self._pairs(round_number, client_ids, kind)]

    def update(self, round_number: int, client_id: str, kind: str = FULL) -> ClientUpdate:
        return self.updates(round_number, [client_id], kind)[0]

    def compacts(self, round_number: int, client_ids: list[str]) -> PackedUpdates:
        """The compact updates of these clients at that round, packed, each with every row it touched then."""
        stored = self._round(round_number, COMPACT)
        try:
            return stored.select(client_ids)
        except KeyError as missing:
            client = missing.args[0]
            raise HistoryError(f"no stored {COMPACT} update for client {client} at round {round_number}") from None

    def _pairs(self, round_number: int, client_ids: list[str], kind: str) -> list[tuple[ClientUpdate, np.ndarray]]:
        stored = self._round(round_number, kind)
        where = {client: i for i, client in enumerate(stored.clients)}
        missing = [c for c in client_ids if c not in where]
        if missing:
            raise HistoryError(f"no stored {kind} update for client {missing[0]} at round {round_number}")
        return [stored.unpack(where[c]) for c in client_ids]

    def client_ids(self) -> set[str]:
        """Every client id that appears anywhere in the history."""
        found: set[str] = set()
        for table in ("participation", "sizes"):
            found |= {c for (c,) in self.db.execute(f"SELECT DISTINCT client_id FROM {table}")}
        for (clients,) in self.db.execute("SELECT clients FROM round_updates"):
            found |= set(json.loads(clients))
        return found

    # ---- forgetting and accounting ---------------------------------------------------------------

    def forget(self, client_ids: list[str]) -> None:
        """Delete every row of these clients, rewrite every stored round without them, then compact
        the file so their bytes are gone too (once the open transaction commits)."""
        leaving = set(client_ids)
        with self.transaction():
            for table in ("participation", "sizes"):
                self.db.executemany(f"DELETE FROM {table} WHERE client_id = ?", [(c,) for c in client_ids])
            for round_number, kind, clients in self.db.execute(
                "SELECT round, kind, clients FROM round_updates"
            ).fetchall():
                if leaving & set(json.loads(clients)):
                    self._repack_without(round_number, kind, leaving)
        self.vacuum()

    def clear(self) -> None:
        """Drop every stored round (Retrain rewrites the history from round 1)."""
        self._cache = {}
        with self.transaction():
            for table in ("participation", "sizes", "checkpoints", "round_updates", "round_tensors", "accounting"):
                self.db.execute(f"DELETE FROM {table}")  # accounting too: Retrain counts its rounds again

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes of stored arrays by kind and their `total`; `file`, the pages the history's file uses
        (what the server holds: the arrays plus who took part in which round, the ids and keys and
        their indexes, up to 30x the arrays for Retrain's small history); and what keeping every full
        float32 update of every round would take."""
        one = lambda sql, *args: int((self.db.execute(sql, args).fetchone() or (0,))[0] or 0)  # noqa: E731
        index = " + ".join(f"LENGTH({name})" for name in self.INDEX_ARRAYS)
        kinds = {"checkpoints": one("SELECT SUM(LENGTH(data)) FROM checkpoints")}
        for kind in (FULL, COMPACT):
            kinds[kind] = one("SELECT SUM(LENGTH(data)) FROM round_tensors WHERE kind = ?", kind)
            kinds[kind] += one(f"SELECT SUM({index}) FROM round_updates WHERE kind = ?", kind)
        kinds["sizes"] = 8 * one("SELECT COUNT(*) FROM sizes")
        kinds["total"] = sum(kinds.values())
        kinds["file"] = (one("PRAGMA page_count") - one("PRAGMA freelist_count")) * one("PRAGMA page_size")
        kinds["every_full_update"] = one("SELECT bytes FROM accounting WHERE name = 'every_full_update'")
        return kinds
