"""The CSV loader, the Dataset helpers it shares with every loader, and load_dataset's dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedunlearn.data import DATASETS, load_dataset
from fedunlearn.data.csv_loader import load_csv
from fedunlearn.data.dataset import describe, drop_users_with_fewer_than, from_frame, keep_ratings_at_least
from fedunlearn.errors import FedUnlearnError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def interactions(tmp_path: Path) -> Path:
    return write(
        tmp_path / "interactions.csv",
        "user,item,rating,timestamp\n"
        "10,a,4,100\n"
        "2,b,5,90\n"
        "10,b,1,95\n"
        "2,a,2,80\n"
        "10,a,3,120\n"  # repeats (10, a): this later one is kept
        "2,c,4,70\n"
        "10,c,5,70\n",
    )


def test_ids_attributes_and_duplicates(interactions: Path, tmp_path: Path) -> None:
    users = write(tmp_path / "users.csv", "user,gender,age\n2,F,25-34\n99,M,56+\n10,M,\n")
    ds = load_csv(interactions, users, name="mine")
    assert ds.name == "mine"
    assert ds.user_ids.dtype == np.int64 and ds.user_ids.tolist() == [2, 10]  # numeric order, 99 ignored
    assert ds.item_ids.tolist() == ["a", "b", "c"]
    assert ds.n_interactions == 6
    # rows in source order, minus the earlier (10, a)
    assert ds.users.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.items.tolist() == [1, 1, 0, 0, 2, 2]
    assert ds.ratings.tolist() == [5, 1, 2, 3, 4, 5]
    assert ds.timestamps.tolist() == [90, 95, 80, 120, 70, 70]
    assert ds.attributes.to_dict("list") == {"gender": ["F", "M"], "age": ["25-34", "unknown"]}


def test_optional_columns_default(tmp_path: Path) -> None:
    path = write(tmp_path / "i.csv", "item,user\nx,u2\ny,u1\nx,u2\n\nz,u10\n")
    ds = load_csv(path)
    assert ds.user_ids.dtype == object and ds.user_ids.tolist() == ["u1", "u10", "u2"]
    assert ds.ratings.tolist() == [1.0, 1.0, 1.0]
    assert ds.timestamps.tolist() == [1, 2, 3]  # row order; the repeated (u2, x) at row 2 wins
    assert ds.attributes.shape == (3, 0)


def test_users_missing_from_users_file_are_unknown(interactions: Path, tmp_path: Path) -> None:
    users = write(tmp_path / "users.csv", "gender,user\nF,2\n")
    assert load_csv(interactions, users).attributes["gender"].tolist() == ["F", "unknown"]


def test_a_value_other_tools_write_for_unknown_is_kept_but_named(interactions: Path, tmp_path: Path, capsys) -> None:
    """'NA' made a class of its own without a word (an audit then read three classes, chance 1/3: a
    review); it stays a value (the file says so), and the loader says where leaving it empty means unknown."""
    users = write(tmp_path / "users.csv", "user,gender,occupation\n2,NA,none\n10,M,none\n")
    read = load_csv(interactions, users).attributes.to_dict("list")
    assert read == {"gender": ["NA", "M"], "occupation": ["none", "none"]}
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gender is 'NA' for 1 users" in error and "occupation" not in error
    load_csv(interactions, users)  # a run loads its data several times: said once
    assert capsys.readouterr().err == ""


def test_non_canonical_integer_ids_stay_distinct(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "i.csv", "user,item\n7,1\n007,1\n"))
    assert ds.user_ids.tolist() == ["007", "7"] and ds.item_ids.tolist() == [1]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("user,rating\n1,2\n", r"missing column\(s\) item \(header is user,rating\)"),
        ("user,item,score\n1,2,3\n", r"unexpected column\(s\) score: allowed are user, item, rating, timestamp"),
        ("user,item,rating\n1,2,3\n1,3,good\n", r"i\.csv:3: rating must be a number, got 'good'"),
        ("user,item,rating\n1,2,inf\n", r"i\.csv:2: rating must be a number, got 'inf'"),
        ("user,item,timestamp\n1,2,3\n\n1,3,4.5\n", r"i\.csv:4: timestamp must be an integer"),
        ("user,item\n1,2\n1,3,4\n", r"i\.csv:3: expected 2 values \(user,item\), got 3"),
        ("user,item\n1,2\n,3\n", r"i\.csv:3: empty user"),
        ("user,item\n", r"has a header but no interactions"),
        ("", r"is empty: the first line must be a header"),
        ("user,item,user\n1,2,3\n", r"column\(s\) user appear twice"),
    ],
)
def test_interaction_file_errors(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "i.csv", text)
    with pytest.raises(FedUnlearnError, match=problem) as error:
        load_csv(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id,gender\n1,M\n", r"u\.csv: missing column\(s\) user"),
        ("user,gender\n1,M\n2,F\n1,F\n", r"u\.csv:4: user 1 already appears on line 2"),
    ],
)
def test_users_file_errors(interactions: Path, tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(FedUnlearnError, match=problem):
        load_csv(interactions, write(tmp_path / "u.csv", text))


def test_missing_files(interactions: Path, tmp_path: Path) -> None:
    with pytest.raises(FedUnlearnError, match=rf"interactions file {tmp_path / 'nope.csv'} not found"):
        load_csv(tmp_path / "nope.csv")
    with pytest.raises(FedUnlearnError, match=rf"users file {tmp_path / 'nope.csv'} not found"):
        load_csv(interactions, tmp_path / "nope.csv")


def small() -> pd.DataFrame:
    """User 1: ratings 5,4,1,2; user 2: 5,5,5; user 3: 1,1,1,1 (items i1..i5)."""
    rows = [(1, "i1", 5), (1, "i2", 4), (1, "i3", 1), (1, "i4", 2), (2, "i1", 5), (2, "i2", 5), (2, "i5", 5)]
    rows += [(3, item, 1) for item in ("i1", "i2", "i3", "i4")]
    frame = pd.DataFrame(rows, columns=["user", "item", "rating"])
    frame["timestamp"] = np.arange(len(frame))
    return frame


def test_keep_ratings_at_least_reindexes() -> None:
    attributes = pd.DataFrame({"gender": ["M", "F", "F"]}, index=[1, 2, 3])
    ds = from_frame("t", small(), attributes)
    assert keep_ratings_at_least(ds, 0) is ds
    kept = keep_ratings_at_least(ds, 4)
    assert kept.user_ids.tolist() == [1, 2] and kept.item_ids.tolist() == ["i1", "i2", "i5"]
    assert kept.users.tolist() == [0, 0, 1, 1, 1] and kept.items.tolist() == [0, 1, 0, 1, 2]
    assert kept.attributes["gender"].tolist() == ["M", "F"]
    assert kept.attributes.index.tolist() == [0, 1]


def test_drop_users_with_fewer_than() -> None:
    ds = from_frame("t", small(), pd.DataFrame(index=[1, 2, 3]))
    same, dropped = drop_users_with_fewer_than(ds, 3)
    assert same is ds and dropped == 0
    kept, dropped = drop_users_with_fewer_than(ds, 4)
    assert dropped == 1
    assert kept.user_ids.tolist() == [1, 3] and kept.item_ids.tolist() == ["i1", "i2", "i3", "i4"]
    assert kept.users.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and kept.n_items == 4


def test_describe() -> None:
    attributes = pd.DataFrame({"gender": ["F", "M", "F"]}, index=[1, 2, 3])
    text = describe(from_frame("t", small(), attributes))
    assert text.splitlines() == [
        "dataset: t",
        "users: 3",
        "items: 5",
        "interactions: 11",
        "density: 73.33%",
        "interactions per user: min 3, median 4, max 4",
        "gender (2 values):",
        "  F        2   66.7%",
        "  M        1   33.3%",
    ]


def test_load_dataset_filters_and_dispatches(tmp_path: Path) -> None:
    path = tmp_path / "i.csv"
    small().to_csv(path, index=False)
    assert load_dataset("csv", path=str(path)).n_users == 3
    ds = load_dataset("csv", path=str(path), min_rating=4)
    assert ds.user_ids.tolist() == [2]  # user 1 keeps only 2 interactions rated >= 4
    with pytest.raises(FedUnlearnError, match="no user of csv has 3 or more interactions rated >= 5.5"):
        load_dataset("csv", path=str(path), min_rating=5.5)


def test_load_dataset_errors() -> None:
    assert DATASETS == ("synthetic", "ml-100k", "ml-1m", "csv")
    with pytest.raises(FedUnlearnError, match="needs an interactions file"):
        load_dataset("csv")
    with pytest.raises(FedUnlearnError) as error:
        load_dataset("movielens")
    assert str(error.value) == "unknown dataset 'movielens': choose one of synthetic, ml-100k, ml-1m, csv"


def test_a_users_file_the_audit_would_read_otherwise_than_it_means_is_said_once(tmp_path: Path, capsys) -> None:
    """Each left users without attributes or split a class, and the audit's figures still looked
    normal (a review): ids padded with zeros in one file only, values differing in case, a numeric
    attribute of many values (each its own class), a literal 'Unknown'."""
    interactions = write(tmp_path / "i.csv", "user,item\n" + "".join(f"{u},{u % 7}\n" for u in range(30)))
    rows = "".join(f"{u:03d},{'Mm'[u % 2]},{20 + u},{'Unknown' if u == 3 else 'x'}\n" for u in range(1, 30))
    users = write(tmp_path / "u.csv", "user,gender,age,job\n" + rows)
    attributes = load_csv(interactions, users).attributes
    assert set(attributes["gender"]) == {"unknown"}  # no padded id matches a user
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 4 and all(line.startswith("fedunlearn: warning: ") for line in error)
    assert f"{users}: 30 of the 30 users have no row here, their attributes unknown and 29 of its 29 rows name " \
           f"no user of {interactions} ('001', '002', '003', ...)" in error[-1]  # fmt: skip
    assert "gender has values that differ only in case ('M' / 'm')" in error[0]
    assert "age holds 29 distinct numbers, each read as a class of its own" in error[1]
    assert "job is 'Unknown' for 1 users, read as a value of its own" in error[2]
    load_csv(interactions, users)
    assert capsys.readouterr().err == ""  # once per file


def test_a_users_file_with_rows_missing_or_extra_is_said_without_the_ids_advice(tmp_path: Path, capsys) -> None:
    interactions = write(tmp_path / "i.csv", "user,item\n" + "".join(f"{u},{u % 7}\n" for u in range(30)))
    missing = write(tmp_path / "m.csv", "user,gender\n" + "".join(f"{u},F\n" for u in range(3, 30)))
    load_csv(interactions, missing)
    assert capsys.readouterr().err == f"fedunlearn: warning: {missing}: 3 of the 30 users have no row here, " \
                                      "their attributes unknown\n"  # fmt: skip
    extra = write(tmp_path / "x.csv", "user,gender\n" + "".join(f"{u},F\n" for u in range(32)))
    load_csv(interactions, extra)
    assert capsys.readouterr().err == f"fedunlearn: warning: {extra}: 2 of its 32 rows name no user of " \
                                      f"{interactions} ('30', '31')\n"  # fmt: skip
