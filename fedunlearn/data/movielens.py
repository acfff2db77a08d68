"""MovieLens 100K and 1M: find the files (data folder, cache, or a verified download) and parse them."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pooch
import requests

from fedunlearn.data.dataset import BadNumber, Dataset, from_frame, parse_numbers
from fedunlearn.errors import FedUnlearnError

# Official archives and their md5 (as published by GroupLens next to each zip).
SOURCES: dict[str, tuple[str, str]] = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}
FILES = {"ml-100k": ("u.data", "u.user"), "ml-1m": ("ratings.dat", "users.dat")}
# (ratings, users) line counts of the official files; some public copies are altered.
OFFICIAL_COUNTS = {"ml-100k": (100_000, 943), "ml-1m": (1_000_209, 6_040)}

AGE_GROUPS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_BOUNDS = (18, 25, 35, 45, 50, 56)  # lower bounds of the groups after "<18"
_ML1M_AGE_CODES = dict(zip((1, 18, 25, 35, 45, 50, 56), AGE_GROUPS))
ML1M_OCCUPATIONS = (
    "other or not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
DATA_DIR_ENV = "FEDUNLEARN_DATA_DIR"


def load_movielens(
    name: str,
    data_dir: str | Path | None = None,
    source: tuple[str, str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    check_counts: bool = True,
) -> Dataset:
    """Load "ml-100k" or "ml-1m".

    data_dir: the folder holding the files; when given nothing else is tried.
    source: (url, md5) replacing the official archive; its data is not count-checked.
    cache_dir: where downloads go (default: the per-user cache).
    check_counts: compare line counts with the official release (skip for small test files).
    """
    if name not in SOURCES:
        raise FedUnlearnError(f"unknown MovieLens dataset '{name}': choose one of {', '.join(SOURCES)}")
    folder = locate(name, data_dir, source, cache_dir)
    parse = _parse_ml100k if name == "ml-100k" else _parse_ml1m
    return parse(folder, check_counts and source is None)


def locate(
    name: str,
    data_dir: str | Path | None = None,
    source: tuple[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The folder with the files: data_dir, else $FEDUNLEARN_DATA_DIR/<name>, else the cache, else download."""
    if data_dir is not None:
        folder = Path(data_dir)
        for file in FILES[name]:
            if not (folder / file).is_file():
                raise FedUnlearnError(
                    f"{folder / file} not found: put the {name} files ({', '.join(FILES[name])}) in {folder}"
                )
        return folder
    env = os.environ.get(DATA_DIR_ENV)
    if env and _has_files(Path(env) / name, name):
        return Path(env) / name
    cache = Path(cache_dir) if cache_dir is not None else Path(pooch.os_cache("fedunlearn"))
    if _has_files(cache / name, name):
        return cache / name
    manual = Path(env) / name if env else cache / name
    return _download(name, source or SOURCES[name], cache, manual)


def _has_files(folder: Path, name: str) -> bool:
    return all((folder / file).is_file() for file in FILES[name])


def _download(name: str, source: tuple[str, str], cache: Path, manual: Path) -> Path:
    """Fetch the zip, check its md5, and move the extracted folder to cache/<name> only if all went well."""
    url, md5 = source
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {name} from {url} to {target}", file=sys.stderr)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # pooch would name the temporary staging folder
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-download-") as staging:
        try:
            pooch.retrieve(
                url,
                known_hash=f"md5:{md5}",
                fname=f"{name}.zip",
                path=staging,
                processor=pooch.Unzip(extract_dir="extracted"),
            )
        except ValueError as exc:  # pooch: hash mismatch (the download is already deleted)
            raise FedUnlearnError(
                f"the {name} archive from {url} does not have md5 {md5} (altered or corrupted): "
                f"retry later, or put verified files in {manual}"
            ) from exc
        except (requests.RequestException, OSError, zipfile.BadZipFile) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise FedUnlearnError(
                f"could not download {name} from {url}: {reason}; put the files in {manual} or check the network"
            ) from exc
        finally:
            logger.setLevel(level)
        folder = _folder_with(Path(staging) / "extracted", FILES[name][0])
        if folder is None or not _has_files(folder, name):
            raise FedUnlearnError(
                f"the archive from {url} lacks {' or '.join(FILES[name])}: put the {name} files in {manual}"
            )
        try:
            os.replace(folder, target)
        except OSError:
            if _has_files(target, name):  # another process finished the same download first
                return target
            shutil.rmtree(target)  # a stale, incomplete folder of ours
            os.replace(folder, target)
    return target


def _folder_with(root: Path, file: str) -> Path | None:
    found = sorted(root.rglob(file))
    return found[0].parent if found else None


RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_RATING_TYPES = {"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64}


class _Table:
    """A delimited text file as string columns, remembering line numbers for error messages.

    Precise but slow (about 2 s per million lines): the ratings files go through _read_ratings.
    """

    def __init__(self, path: Path, sep: str, columns: tuple[str, ...]) -> None:
        self.path = path
        rows, lines = [], []
        with path.open(encoding="latin-1") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split(sep)
                if len(fields) != len(columns):
                    raise FedUnlearnError(
                        f"{path}:{number}: expected {len(columns)} fields separated by {sep!r} "
                        f"({', '.join(columns)}), got {len(fields)}: {line[:80]!r}; fix or remove the line"
                    )
                rows.append(fields)
                lines.append(number)
        self.lines = np.asarray(lines, dtype=np.int64)
        values = list(zip(*rows)) if rows else [()] * len(columns)
        self.columns = {column: np.asarray(col, dtype=str) for column, col in zip(columns, values)}

    def __len__(self) -> int:
        return len(self.lines)

    def strings(self, column: str) -> np.ndarray:
        return self.columns[column]

    def numbers(self, column: str, dtype: type) -> np.ndarray:
        try:
            return parse_numbers(self.columns[column], dtype)
        except BadNumber as bad:
            self.fail(bad.row, f"expected a number for {column}, got {bad.value!r}")

    def fail(self, row: int, problem: str) -> NoReturn:
        raise FedUnlearnError(f"{self.path}:{self.lines[row]}: {problem}; fix or remove the line")

    def unique_ids(self, column: str) -> np.ndarray:
        ids = self.numbers(column, np.int64)
        if len(np.unique(ids)) < len(ids):
            seen: set[int] = set()
            for row, value in enumerate(ids.tolist()):
                if value in seen:
                    self.fail(row, f"{column} {value} appears twice")
                seen.add(value)
        return ids


def _read_ratings(path: Path, sep: str) -> pd.DataFrame:
    """user, item, rating, timestamp via pandas' C parser; anything irregular goes through _Table,
    which either raises the precise error or reads what the fast path refused."""
    text = path.read_text(encoding="latin-1").replace(sep, "\t")
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep="\t",
            header=None,
            dtype=dict(enumerate(_RATING_TYPES.values())),
            quoting=csv.QUOTE_NONE,
            engine="c",
        )
        regular = frame.shape[1] == len(RATING_COLUMNS) and not frame.isna().any().any()
    except (ValueError, OverflowError, pd.errors.EmptyDataError):
        regular = False
    if regular:
        frame.columns = list(RATING_COLUMNS)
        return frame
    table = _Table(path, sep, RATING_COLUMNS)
    return pd.DataFrame({column: table.numbers(column, dtype) for column, dtype in _RATING_TYPES.items()})


def _check_counts(name: str, ratings: pd.DataFrame, ratings_path: Path, users: _Table) -> None:
    for path, found, expected in zip((ratings_path, users.path), (len(ratings), len(users)), OFFICIAL_COUNTS[name]):
        if found != expected:
            raise FedUnlearnError(
                f"{path} has {found:,} lines but the official {name} has {expected:,}: "
                f"the copy is altered or truncated; replace it with the files from {SOURCES[name][0]}"
            )


def age_group(ages: np.ndarray) -> np.ndarray:
    """Raw ages in years to the 7 ML-1M age groups."""
    return np.asarray(AGE_GROUPS, dtype=object)[np.digitize(ages, _AGE_BOUNDS)]


def _parse_ml100k(folder: Path, check_counts: bool) -> Dataset:
    ratings = _read_ratings(folder / "u.data", "\t")
    users = _Table(folder / "u.user", "|", ("user", "age", "gender", "occupation", "zip"))
    if check_counts:
        _check_counts("ml-100k", ratings, folder / "u.data", users)
    attributes = pd.DataFrame(
        {
            "gender": users.strings("gender"),
            "age": age_group(users.numbers("age", np.int64)),
            "occupation": users.strings("occupation"),
        },
        index=users.unique_ids("user"),
    )
    return from_frame("ml-100k", ratings, attributes)


def _parse_ml1m(folder: Path, check_counts: bool) -> Dataset:
    ratings = _read_ratings(folder / "ratings.dat", "::")
    users = _Table(folder / "users.dat", "::", ("user", "gender", "age", "occupation", "zip"))
    if check_counts:
        _check_counts("ml-1m", ratings, folder / "ratings.dat", users)
    ages = users.numbers("age", np.int64)
    occupations = users.numbers("occupation", np.int64)
    bad_age = np.flatnonzero(~np.isin(ages, list(_ML1M_AGE_CODES)))
    if len(bad_age):
        users.fail(bad_age[0], f"expected an age code in {sorted(_ML1M_AGE_CODES)}, got {ages[bad_age[0]]}")
    bad_occupation = np.flatnonzero((occupations < 0) | (occupations >= len(ML1M_OCCUPATIONS)))
    if len(bad_occupation):
        row = bad_occupation[0]
        users.fail(row, f"expected an occupation code 0..{len(ML1M_OCCUPATIONS) - 1}, got {occupations[row]}")
    attributes = pd.DataFrame(
        {
            "gender": users.strings("gender"),
            "age": [_ML1M_AGE_CODES[code] for code in ages.tolist()],
            "occupation": np.asarray(ML1M_OCCUPATIONS, dtype=object)[occupations],
        },
        index=users.unique_ids("user"),
    )
    return from_frame("ml-1m", ratings, attributes)
