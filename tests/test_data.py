"""Adapters on the real files, checksums, pulling from an origin, sampling, ingest, and bad input."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fusionrank.data.contract import JUDGMENTS, PRODUCTS, Tables, conform
from fusionrank.data.ingest import ingest, load_tables, read_manifest
from fusionrank.data.sources import (
    GAMES_ANCHOR,
    SOURCES,
    load_source,
    pull_source,
    read_utf8_lines,
    sample,
    verify_files,
)
from fusionrank.errors import DataError


@pytest.fixture(scope="module")
def homedepot(data_dir: Path) -> Tables:
    return load_source("homedepot", data_dir)


@pytest.fixture(scope="module")
def games(data_dir: Path) -> Tables:
    return load_source("amazon-games", data_dir)


def test_homedepot_adapter_gives_the_published_counts(homedepot: Tables) -> None:
    assert homedepot.modes == ("search",)
    assert len(homedepot.judgments) == 74_067
    assert homedepot.judgments["query"].nunique() == 11_795
    assert len(homedepot.products) == homedepot.products["product_id"].nunique() == 54_667
    assert homedepot.judgments["relevance"].between(1, 3).all()
    assert str(homedepot.products["product_id"].dtype) == "string"
    # latin-1 decoding: the file's high bytes (0xe5 0xa1 stands for a degree sign) arrive as characters,
    # not as errors or replacement characters
    assert homedepot.products["title"].str.contains("30\u00e5\u00a1 Galvanized").any()
    assert not homedepot.products["title"].str.contains("\ufffd").any()


def test_games_adapter_orders_events_and_derives_times(games: Tables) -> None:
    inter = games.interactions
    assert games.modes == ("recommendation",)
    assert len(inter) == 440_264
    assert inter["user_id"].nunique() == 50_546
    assert len(games.products) == 16_859
    last = inter.groupby("user_id")["event_timestamp"].max()
    assert (last == GAMES_ANCHOR).all(), "every user's last purchase must fall on the anchor"
    user0 = inter[inter["user_id"] == "0"]
    assert list(user0["product_id"]) == [str(i) for i in range(15)]
    assert user0["event_timestamp"].is_monotonic_increasing
    assert (user0["event_timestamp"].diff().dropna() == pd.Timedelta(days=1)).all()
    protocols = games.eval_candidates.groupby("protocol")["user_id"].nunique().to_dict()
    assert protocols == {"llmrank-6k": 6000, "llmrank-200": 200}


def test_content_hash_is_stable_and_content_sensitive(homedepot: Tables) -> None:
    again = Tables(products=homedepot.products.copy(), judgments=homedepot.judgments.copy())
    assert again.content_hash() == homedepot.content_hash()
    changed = homedepot.judgments.copy()
    changed.loc[0, "relevance"] = 1.0 if changed.loc[0, "relevance"] != 1.0 else 2.0
    assert Tables(products=homedepot.products, judgments=changed).content_hash() != homedepot.content_hash()


def test_sample_keeps_whole_queries_and_protocol_users(homedepot: Tables, games: Tables) -> None:
    small = sample(homedepot, max_queries=50, seed=1)
    assert small.judgments["query"].nunique() == 50
    full_counts = homedepot.judgments["query"].value_counts()
    sampled_counts = small.judgments["query"].value_counts()
    assert (sampled_counts == full_counts[sampled_counts.index]).all(), "a sampled query lost judgments"
    assert sample(homedepot, max_queries=50, seed=1).content_hash() == small.content_hash()
    few = sample(games, max_users=300, seed=0)
    assert few.interactions["user_id"].nunique() == 300
    small_protocol = set(games.eval_candidates.query("protocol == 'llmrank-200'")["user_id"])
    assert small_protocol <= set(few.interactions["user_id"])


def test_ingest_writes_tables_and_a_manifest(tmp_path: Path, data_dir: Path) -> None:
    manifest = ingest("homedepot", tmp_path, data_dir=data_dir, max_queries=20, seed=0)
    assert read_manifest(tmp_path) == manifest
    assert manifest["counts"]["queries"] == 20
    back = Tables.read(tmp_path)
    assert back.content_hash() == manifest["data_hash"]
    tables, origins = load_tables(f"parquet:{tmp_path}")
    assert tables.content_hash() == manifest["data_hash"]
    assert origins["judgments"].endswith("judgments.parquet")


# bad input


def copy_source(name: str, data_dir: Path, target: Path) -> Path:
    for f in SOURCES[name].files:
        (target / f.relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / f.relpath, target / f.relpath)
    return target


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.csv\.zip: missing file of source 'homedepot'.*data pull"):
        load_source("homedepot", tmp_path)


def test_checksum_mismatch_is_refused(tmp_path: Path, data_dir: Path) -> None:
    copy_source("amazon-games", data_dir, tmp_path)
    with (tmp_path / "amazon-games/Games-6k.item").open("ab") as handle:
        handle.write(b"99999\tAn extra game\n")
    with pytest.raises(DataError, match=r"Games-6k\.item: checksum mismatch.*expected sha256 be9cea58"):
        verify_files(SOURCES["amazon-games"], tmp_path)


def test_undecodable_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "items.item"
    path.write_bytes(b"item_id:token\ttitle:token_seq\n0\tGood\n1\tBad \xff title\n")
    with pytest.raises(DataError, match=r"items\.item: line 3 is not valid UTF-8 \(byte 0xff"):
        read_utf8_lines(path)


def test_broken_archive_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "homedepot" / "train.csv.zip"
    bad.parent.mkdir()
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("other.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"cannot read train\.csv"):
        SOURCES["homedepot"].adapter({"homedepot/train.csv.zip": bad})


def test_missing_column_names_file_and_column() -> None:
    frame = pd.DataFrame({"product_id": ["1"], "relevance": [2.0]})
    with pytest.raises(
        DataError, match=r"judgments\.parquet: table 'judgments' lacks required column\(s\) \['query'\]"
    ):
        conform(frame, JUDGMENTS, "judgments.parquet")


def test_wrong_type_names_column_and_offending_rows() -> None:
    frame = pd.DataFrame(
        {"query": ["a", "b", "c"], "product_id": ["1", "2", "3"], "relevance": [2.0, "x", "y"]}
    )
    with pytest.raises(DataError, match=r"column 'relevance'.*must be float.*\{1: 'x', 2: 'y'\}"):
        conform(frame, JUDGMENTS, "judgments.parquet")
    with pytest.raises(DataError, match="column 'product_id'"):
        conform(pd.DataFrame({"product_id": [1.5], "title": ["t"]}), PRODUCTS, "products.parquet")


def test_a_dataset_needs_judgments_or_interactions() -> None:
    with pytest.raises(DataError, match="at least one of 'interactions' and 'judgments'"):
        Tables(products=pd.DataFrame({"product_id": ["1"], "title": ["t"]}))


def test_read_refuses_a_folder_without_products(tmp_path: Path) -> None:
    pd.DataFrame({"query": ["q"], "product_id": ["1"], "relevance": [1.0]}).to_parquet(
        tmp_path / "judgments.parquet"
    )
    with pytest.raises(DataError, match=r"missing products\.parquet"):
        Tables.read(tmp_path)
    (tmp_path / "products.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"products\.parquet: not a readable parquet file"):
        Tables.read(tmp_path)


# pulling from an origin


@pytest.fixture
def origin(tmp_path: Path, data_dir: Path):
    """A loopback HTTP server holding a copy of the sources (stands in for the public origin)."""
    root = copy_source("homedepot", data_dir, tmp_path / "origin")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pull_fetches_checks_and_then_needs_no_network(tmp_path: Path, origin) -> None:
    _, url = origin
    target = tmp_path / "pulled"
    lines: list[str] = []
    pull_source("homedepot", target, mirror=url, log=lines.append)
    assert "fetched from" in lines[0]
    assert load_source("homedepot", target).judgments.shape == (74_067, 3)
    lines.clear()
    pull_source("homedepot", target, mirror="http://127.0.0.1:9/unreachable", log=lines.append)
    assert "present, checksum ok" in lines[0]


def test_pull_refuses_a_tampered_download_and_keeps_nothing(tmp_path: Path, origin) -> None:
    root, url = origin
    (root / "homedepot/train.csv.zip").write_bytes(b"tampered")
    target = tmp_path / "pulled"
    with pytest.raises(DataError, match="downloaded file has sha256"):
        pull_source("homedepot", target, mirror=url, log=lambda _: None)
    assert not any(p.is_file() for p in target.rglob("*"))


def test_pull_from_an_unreachable_origin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed"):
        pull_source("homedepot", tmp_path, mirror="http://127.0.0.1:9", log=lambda _: None)
