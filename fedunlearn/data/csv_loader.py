"""A user's own data: an interactions CSV and, optionally, a users CSV whose extra columns are attributes."""

from __future__ import annotations

import _csv
import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedunlearn.data.dataset import UNKNOWN, BadNumber, Dataset, from_frame, normalize_ids, parse_numbers
from fedunlearn.errors import FedUnlearnError

REQUIRED = ("user", "item")
OPTIONAL = ("rating", "timestamp")
MISSING_MARKERS = {"na", "n/a", "nan", "null", "?"}  # what other tools write for unknown (not "none": a value)
MANY_NUMBERS = 25  # more distinct numbers than this in a column: likely an ordered quantity, not classes
_WARNED: set[tuple[str, int, str]] = set()  # users files already read in this process (path, mtime, interactions)


def load_csv(interactions_path: str | Path, users_path: str | Path | None = None, name: str = "csv") -> Dataset:
    """Interactions need `user` and `item`; `rating` (default 1) and `timestamp` (default: row order) are optional."""
    path = Path(interactions_path)
    header, rows, lines = _read(path, "interactions")
    extra = [column for column in header if column not in REQUIRED + OPTIONAL]
    if extra:
        raise FedUnlearnError(
            f"{path}: unexpected column(s) {', '.join(extra)}: allowed are {', '.join(REQUIRED + OPTIONAL)}"
        )
    _require(path, header, REQUIRED)
    if not rows:
        raise FedUnlearnError(f"{path} has a header but no interactions: add one row per interaction")
    columns = dict(zip(header, map(list, zip(*rows))))
    frame = pd.DataFrame(
        {
            "user": _ids(path, columns["user"], lines, "user"),
            "item": _ids(path, columns["item"], lines, "item"),
            "rating": _numbers(path, columns, lines, "rating", np.float32, np.ones(len(rows), np.float32)),
            "timestamp": _numbers(path, columns, lines, "timestamp", np.int64, np.arange(len(rows))),
        }
    )
    if users_path:
        clients = {str(user) for user in normalize_ids(frame["user"].to_numpy())}  # as from_frame matches them
        attributes = _attributes(Path(users_path), clients, path)
    else:
        attributes = pd.DataFrame(index=pd.Index([], dtype=object))
    return from_frame(name, frame, attributes)


def _read(path: Path, what: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header and rows of equal width (values stripped), with the line number each row starts on."""
    if not path.is_file():
        raise FedUnlearnError(f"{what} file {path} not found: check the path")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _rows(path, csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise FedUnlearnError(f"{path} is not UTF-8 text ({exc.reason}): save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise FedUnlearnError(f"{path}: not valid CSV ({exc}): fix the file") from exc


def _rows(path: Path, reader: _csv.Reader) -> tuple[list[str], list[list[str]], list[int]]:
    header = [column.strip() for column in next(reader, [])]
    if not any(header):
        raise FedUnlearnError(f"{path} is empty: the first line must be a header such as user,item")
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise FedUnlearnError(f"{path}: column(s) {', '.join(repeated)} appear twice in the header: rename them")
    rows, lines = [], []
    line = reader.line_num + 1
    for row in reader:
        values = [value.strip() for value in row]
        if any(values):
            if len(values) != len(header):
                raise FedUnlearnError(
                    f"{path}:{line}: expected {len(header)} values ({','.join(header)}), got {len(values)}; fix the row"
                )
            rows.append(values)
            lines.append(line)
        line = reader.line_num + 1
    return header, rows, lines


def _require(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [column for column in required if column not in header]
    if missing:
        raise FedUnlearnError(
            f"{path}: missing column(s) {', '.join(missing)} (header is {','.join(header)}): add them to the header"
        )


def _ids(path: Path, values: list[str], lines: list[int], column: str) -> np.ndarray:
    for row, value in enumerate(values):
        if not value:
            raise FedUnlearnError(f"{path}:{lines[row]}: empty {column}: every row needs a {column} id")
    return np.asarray(values, dtype=object)


def _numbers(
    path: Path, columns: dict[str, list[str]], lines: list[int], column: str, dtype: type, default: np.ndarray
) -> np.ndarray:
    if column not in columns:
        return default
    try:
        return parse_numbers(np.asarray(columns[column], dtype=str), dtype)
    except BadNumber as bad:
        kind = "an integer (e.g. Unix seconds)" if dtype is np.int64 else "a number"
        raise FedUnlearnError(
            f"{path}:{lines[bad.row]}: {column} must be {kind}, got {bad.value!r}; fix the value"
        ) from None


def _warn_of_odd_values(path: Path, table: pd.DataFrame) -> None:
    """Values an audit would read other than the file means: each is a class of its own."""
    for column in table.columns:
        values = table[column][table[column] != ""]
        markers = sorted({value for value in values if value.lower() in MISSING_MARKERS | {UNKNOWN}} - {UNKNOWN})
        if markers:
            count = int(values.isin(markers).sum())
            _warn(f"{path}: {column} is {' / '.join(map(repr, markers))} for {count} users, read as a value of "
                  "its own; leave the cell empty where it means unknown")  # fmt: skip
        if (values == UNKNOWN).any():
            _warn(f"{path}: {column} is {UNKNOWN!r} for {int((values == UNKNOWN).sum())} users, read as unknown "
                  "(left out of the attack), as an empty cell")  # fmt: skip
        plain = values[~values.str.lower().isin(MISSING_MARKERS | {UNKNOWN})]  # said above
        spellings = plain.groupby(plain.str.lower()).unique()
        alike = [" / ".join(map(repr, sorted(found))) for found in spellings if len(found) > 1]
        if alike:
            more = ", ..." if len(alike) > 3 else ""
            _warn(f"{path}: {column} has values that differ only in case ({', '.join(alike[:3])}{more}), each "
                  "read as a class of its own; write each class one way")  # fmt: skip
        distinct = plain.unique()
        if len(distinct) > MANY_NUMBERS and all(_is_number(value) for value in distinct):
            _warn(f"{path}: {column} holds {len(distinct)} distinct numbers, each read as a class of its own "
                  "(an ordered attribute then reads as almost nothing to the attacks); bin it into groups in the "
                  "file")  # fmt: skip


def _warn_of_unmatched_users(path: Path, table: pd.DataFrame, clients: set[str], interactions: Path) -> None:
    """Ids written otherwise in the two files ('007' against '7') left users without attributes
    silently: the audit then tested fewer users and looked normal (a review)."""
    rows = set(table.index)
    lacking, strangers = len(clients - rows), sorted(rows - clients)
    parts = [f"{lacking} of the {len(clients)} users have no row here, their attributes unknown"] if lacking else []
    if strangers:
        examples = ", ".join(map(repr, strangers[:3])) + (", ..." if len(strangers) > 3 else "")
        parts.append(f"{len(strangers)} of its {len(rows)} rows name no user of {interactions} ({examples})")
    if lacking and strangers:
        parts[-1] += "; write user ids alike in both files ('007' and '7' are different ids)"
    if parts:
        _warn(f"{path}: {' and '.join(parts)}")


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _warn(message: str) -> None:
    print(f"fedunlearn: warning: {message}", file=sys.stderr)


def _attributes(path: Path, clients: set[str], interactions: Path) -> pd.DataFrame:
    """Attribute columns as strings, indexed by user id; empty values become "unknown". What an audit
    would read other than the file means is said once per file (`clients`: the users, as ids)."""
    header, rows, lines = _read(path, "users")
    _require(path, header, ("user",))
    seen: dict[str, int] = {}
    for row, line in zip(rows, lines):
        user = row[header.index("user")]
        if not user:
            raise FedUnlearnError(f"{path}:{line}: empty user: every row needs a user id")
        if user in seen:
            raise FedUnlearnError(
                f"{path}:{line}: user {user} already appears on line {seen[user]}: keep one row per user"
            )
        seen[user] = line
    table = pd.DataFrame(rows, columns=header, dtype=object).set_index("user")
    stamp = (str(path.resolve()), path.stat().st_mtime_ns, str(interactions.resolve()))
    if stamp not in _WARNED:  # a run loads its data several times (preflight, each seed, each process)
        _WARNED.add(stamp)
        _warn_of_odd_values(path, table)
        _warn_of_unmatched_users(path, table, clients, interactions)
    return table.replace("", UNKNOWN)
