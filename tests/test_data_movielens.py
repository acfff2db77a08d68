"""MovieLens loaders: the real ML-100K copy, small fixtures, lookup order and verified downloads."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.data import movielens
from fedunlearn.data.movielens import age_group, load_movielens
from fedunlearn.errors import FedUnlearnError

U_DATA = "1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t102\n3\t30\t2\t99\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n"


def write_ml100k(folder: Path, data: str = U_DATA, users: str = U_USER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(data)
    (folder / "u.user").write_text(users)
    return folder


def test_real_ml100k_copy(ml100k_dir: Path) -> None:
    ds = load_movielens("ml-100k", data_dir=ml100k_dir)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
    assert ds.user_ids.dtype == np.int64
    assert np.array_equal(ds.user_ids, np.arange(1, 944))
    assert list(ds.attributes.columns) == ["gender", "age", "occupation"]
    # u.user starts 1|24|M|technician and 2|53|F|other
    assert ds.attributes.iloc[0].tolist() == ["M", "18-24", "technician"]
    assert ds.attributes.iloc[1].tolist() == ["F", "50-55", "other"]
    assert ds.attributes["gender"].value_counts().to_dict() == {"M": 670, "F": 273}
    assert set(ds.attributes["age"]) == set(movielens.AGE_GROUPS)
    assert ds.ratings.dtype == np.float32 and set(np.unique(ds.ratings)) == {1, 2, 3, 4, 5}
    # the first line of u.data: 196 242 3 881250949
    first = np.flatnonzero((ds.user_ids[ds.users] == 196) & (ds.item_ids[ds.items] == 242))
    assert ds.ratings[first].tolist() == [3.0] and ds.timestamps[first].tolist() == [881250949]


def test_age_groups_follow_ml1m_boundaries() -> None:
    ages = np.array([1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73])
    assert age_group(ages).tolist() == [
        "<18",
        "<18",
        "18-24",
        "18-24",
        "25-34",
        "25-34",
        "35-44",
        "35-44",
        "45-49",
        "45-49",
        "50-55",
        "50-55",
        "56+",
        "56+",
    ]


def test_ml100k_fixture_and_count_check(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "ml-100k")
    ds = load_movielens("ml-100k", data_dir=folder, check_counts=False)
    assert ds.user_ids.tolist() == [1, 2, 3] and ds.item_ids.tolist() == [10, 20, 30]
    assert ds.users.tolist() == [0, 0, 1, 2] and ds.items.tolist() == [0, 1, 0, 2]
    assert ds.attributes["age"].tolist() == ["18-24", "50-55", "<18"]
    with pytest.raises(FedUnlearnError, match=r"u\.data has 4 lines but the official ml-100k has 100,000"):
        load_movielens("ml-100k", data_dir=folder)


def test_ml1m_fixture(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
        "2::1193::2::978299000\n6040::3952::1::956703932\n"  # user 2 rates 1193 twice: the later one counts
    )
    (folder / "users.dat").write_text(
        "1::F::1::10::48067\n2::M::56::16::70072\n6040::M::25::0::11106\n9::M::35::20::55117\n"
    )
    ds = load_movielens("ml-1m", data_dir=folder, check_counts=False)
    assert ds.user_ids.tolist() == [1, 2, 6040]  # user 9 has no ratings
    assert ds.item_ids.tolist() == [661, 1193, 3952]
    assert ds.n_interactions == 4
    assert ds.attributes.to_dict("list") == {
        "gender": ["F", "M", "M"],
        "age": ["<18", "56+", "25-34"],
        "occupation": ["K-12 student", "self-employed", "other or not specified"],
    }
    user2 = ds.users == 1
    assert ds.ratings[user2].tolist() == [2.0] and ds.timestamps[user2].tolist() == [978299000]
    with pytest.raises(FedUnlearnError, match=r"ratings\.dat has 5 lines but the official ml-1m has 1,000,209"):
        load_movielens("ml-1m", data_dir=folder)


@pytest.mark.parametrize(
    ("data", "users", "where", "what"),
    [
        ("1\t10\t5\t100\n1\t20\t3\n", U_USER, "u.data:2", "expected 4 fields"),
        ("1\t10\t5\t100\n\nx1\t20\t3\t101\n", U_USER, "u.data:3", "expected a number for user, got 'x1'"),
        (U_DATA, "1|24|M|technician|85711\n2|old|F|other|94043\n", "u.user:2", "for age, got 'old'"),
        (U_DATA, "1|24|M|technician|85711\n1|53|F|other|94043\n", "u.user:2", "user 1 appears twice"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, data: str, users: str, where: str, what: str) -> None:
    folder = write_ml100k(tmp_path / "ml-100k", data, users)
    with pytest.raises(FedUnlearnError) as error:
        load_movielens("ml-100k", data_dir=folder, check_counts=False)
    message = str(error.value)
    assert message.startswith(f"{folder}/{where}: ") and what in message and "\n" not in message


def test_ml1m_bad_codes(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1::5::1\n")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::30::16::70072\n")
    with pytest.raises(FedUnlearnError, match=r"users\.dat:2: expected an age code .* got 30"):
        load_movielens("ml-1m", data_dir=folder, check_counts=False)
    (folder / "users.dat").write_text("1::F::1::21::48067\n")
    with pytest.raises(FedUnlearnError, match=r"users\.dat:1: expected an occupation code 0\.\.20, got 21"):
        load_movielens("ml-1m", data_dir=folder, check_counts=False)


def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text(U_DATA)
    with pytest.raises(FedUnlearnError, match=rf"{tmp_path / 'u.user'} not found: put the ml-100k files"):
        load_movielens("ml-100k", data_dir=tmp_path)


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(movielens.pooch, "retrieve", fail)


def test_data_dir_env_is_used_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    write_ml100k(tmp_path / "env" / "ml-100k")
    write_ml100k(tmp_path / "cache" / "ml-100k", data="9\t9\t1\t1\n")
    monkeypatch.setenv("FEDUNLEARN_DATA_DIR", str(tmp_path / "env"))
    ds = load_movielens("ml-100k", cache_dir=tmp_path / "cache", check_counts=False)
    assert ds.n_interactions == 4


def test_cache_is_used_when_env_folder_lacks_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    (tmp_path / "env" / "ml-100k").mkdir(parents=True)
    write_ml100k(tmp_path / "cache" / "ml-100k", data="9\t9\t1\t1\n")
    monkeypatch.setenv("FEDUNLEARN_DATA_DIR", str(tmp_path / "env"))
    ds = load_movielens("ml-100k", cache_dir=tmp_path / "cache", check_counts=False)
    assert ds.user_ids.tolist() == [9]


class Server:
    """Serves `root` on 127.0.0.1 and counts the requests it answers."""

    def __init__(self, root: Path) -> None:
        self.requests = 0
        counter = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                counter.requests += 1
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.md5 = hashlib.md5((root / "ml-100k.zip").read_bytes()).hexdigest()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """The fixture files zipped the way GroupLens does (one top folder), served locally."""
    monkeypatch.delenv("FEDUNLEARN_DATA_DIR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "ml-100k.zip", "w") as archive:
        archive.writestr("ml-100k/u.data", U_DATA)
        archive.writestr("ml-100k/u.user", U_USER)
        archive.writestr("ml-100k/README", "fixture")
    running = Server(root)
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def test_download_is_verified_and_cached(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = (f"{server.url}/ml-100k.zip", server.md5)
    ds = load_movielens("ml-100k", source=source, cache_dir=cache)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (3, 3, 4)
    assert server.requests == 1
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no zip or staging folder left
    assert sorted(p.name for p in (cache / "ml-100k").iterdir()) == ["README", "u.data", "u.user"]
    again = load_movielens("ml-100k", source=source, cache_dir=cache)
    assert server.requests == 1
    assert np.array_equal(again.items, ds.items)


def test_bad_hash_leaves_nothing_behind(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(FedUnlearnError) as error:
        load_movielens("ml-100k", source=(f"{server.url}/ml-100k.zip", "0" * 32), cache_dir=cache)
    message = str(error.value)
    assert "does not have md5 " + "0" * 32 in message and str(cache / "ml-100k") in message
    assert "\n" not in message
    assert list(cache.iterdir()) == []
    # nothing from the rejected download is reused: the next call downloads again
    load_movielens("ml-100k", source=(f"{server.url}/ml-100k.zip", server.md5), cache_dir=cache)
    assert server.requests == 2


def test_failed_download_is_one_line_with_the_fix(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FedUnlearnError) as error:
        load_movielens("ml-100k", source=(f"{server.url}/missing.zip", server.md5), cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert message.startswith(f"could not download ml-100k from {server.url}/missing.zip: 404")
    assert message.endswith(f"put the files in {tmp_path / 'cache' / 'ml-100k'} or check the network")
    assert "\n" not in message


def test_official_sources() -> None:
    assert movielens.SOURCES == {
        "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
        "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    }
