"""Real data sources: where each file comes from, its checksum, and the adapter into canonical tables.

A new source needs one `Source` entry and one adapter function that returns `Tables`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrank.data.contract import (
    EVAL_CANDIDATES,
    INTERACTIONS,
    JUDGMENTS,
    PRODUCTS,
    Column,
    Mode,
    Tables,
    TableSpec,
    conform,
)
from fusionrank.errors import DataError

DATA_DIR_ENV = "FUSIONRANK_DATA_DIR"
MIRROR_ENV = "FUSIONRANK_DATA_MIRROR"

# Amazon Games has only the order of each user's purchases. Event times are derived from that order:
# the i-th of a user's n purchases happens at GAMES_ANCHOR - (n - 1 - i) days. Every user's last purchase
# therefore falls on the anchor and the one before on the day before, so leave-last-out splitting per
# user coincides with a global time cut and point-in-time feature joins cannot see a user's future.
GAMES_ANCHOR = pd.Timestamp("2018-10-01T00:00:00Z")

# Home Depot's train.csv after renaming to canonical names, checked before it is split into two tables.
_HOMEDEPOT_CSV = TableSpec(
    "homedepot train.csv",
    (
        Column("product_id", "string"),
        Column("title", "string"),
        Column("query", "string"),
        Column("relevance", "float"),
    ),
)


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it lies under the data directory and what it must hash to."""

    relpath: str
    sha256: str
    size: int
    url: str


@dataclass(frozen=True)
class Source:
    """A public dataset and the adapter that turns its files into canonical tables."""

    name: str
    mode: Mode
    description: str
    files: tuple[SourceFile, ...]
    adapter: Callable[[dict[str, Path]], Tables]


def _homedepot(paths: dict[str, Path]) -> Tables:
    path = paths["homedepot/train.csv.zip"]
    try:
        with zipfile.ZipFile(path) as archive, archive.open("train.csv") as raw:
            # The competition file is latin-1: product titles carry bytes such as 0xae (the registered sign).
            frame = pd.read_csv(io.TextIOWrapper(raw, encoding="latin-1"), dtype={"product_uid": str})
    except (zipfile.BadZipFile, KeyError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read train.csv from the archive ({exc})") from exc
    source = f"{path}:train.csv"
    frame = conform(
        frame.rename(columns={"product_uid": "product_id", "product_title": "title", "search_term": "query"}),
        _HOMEDEPOT_CSV,
        source,
    )
    products = frame[["product_id", "title"]].drop_duplicates("product_id").reset_index(drop=True)
    judgments = frame[["query", "product_id", "relevance"]].reset_index(drop=True)
    return Tables(
        products=conform(products, PRODUCTS, source),
        judgments=conform(judgments, JUDGMENTS, source),
    )


def read_utf8_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; DataError naming the line and byte when a byte does not decode."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc
    return text.splitlines()


def _tab_rows(path: Path, expected_fields: int, header: bool) -> list[list[str]]:
    lines = read_utf8_lines(path)
    if header:
        lines = lines[1:]
    rows = []
    for number, line in enumerate(lines, start=2 if header else 1):
        if not line:
            continue
        parts = line.split("\t", expected_fields - 1)
        if len(parts) != expected_fields:
            raise DataError(
                f"{path}: line {number} has {len(parts)} tab-separated fields, expected {expected_fields}: "
                f"{line[:80]!r}"
            )
        rows.append(parts)
    return rows


def _amazon_games(paths: dict[str, Path]) -> Tables:
    item_path = paths["amazon-games/Games-6k.item"]
    items = pd.DataFrame(_tab_rows(item_path, 2, header=True), columns=["product_id", "title"])
    products = conform(items, PRODUCTS, str(item_path))

    inter_path = paths["amazon-games/Games-6k.test.inter"]
    users, products_seq, times = [], [], []
    for number, (user, history, last) in enumerate(_tab_rows(inter_path, 3, header=True), start=2):
        sequence = [*history.split(), last]
        if not last.strip():
            raise DataError(f"{inter_path}: line {number} has an empty last item")
        n = len(sequence)
        users.extend([user] * n)
        products_seq.extend(sequence)
        times.append(np.arange(n - 1, -1, -1))
    offsets = pd.to_timedelta(np.concatenate(times), unit="D")
    interactions = pd.DataFrame(
        {
            "user_id": users,
            "product_id": products_seq,
            "event_timestamp": GAMES_ANCHOR - offsets,
            "event_type": "purchase",
        }
    )

    candidates = []
    for protocol, rel in (("llmrank-6k", "Games-6k.random"), ("llmrank-200", "Games.random")):
        path = paths[f"amazon-games/{rel}"]
        for user, listed in _tab_rows(path, 2, header=False):
            ids = listed.split()
            candidates.append(
                pd.DataFrame(
                    {
                        "user_id": user,
                        "product_id": ids,
                        "position": np.arange(len(ids)),
                        "protocol": protocol,
                    }
                )
            )
    eval_candidates = pd.concat(candidates, ignore_index=True)
    return Tables(
        products=products,
        interactions=conform(interactions, INTERACTIONS, str(inter_path)),
        eval_candidates=conform(eval_candidates, EVAL_CANDIDATES, "amazon-games/*.random"),
    )


_HD = "https://github.com/andmck1/home-depot/raw/41fa8373fa0386b99ff159c696da4b7053531723/data"
_GAMES = (
    "https://raw.githubusercontent.com/RUCAIBox/LLMRank/5ec1154cb74cbf68ed5721212f1d7e79336c39c7"
    "/llmrank/dataset/Games-6k"
)

SOURCES: dict[str, Source] = {
    "homedepot": Source(
        name="homedepot",
        mode="search",
        description="Home Depot Product Search Relevance (Kaggle 2016): 74,067 judged (query, product) pairs",
        files=(
            SourceFile(
                "homedepot/train.csv.zip",
                "f6699098295f36e20fa76d07884aa453e9005aa97d9d6a6c1ac42c37142da88a",
                2_762_913,
                f"{_HD}/train.csv.zip",
            ),
        ),
        adapter=_homedepot,
    ),
    "amazon-games": Source(
        name="amazon-games",
        mode="recommendation",
        description="Amazon Reviews 2018 Video Games purchase sequences with titles (LLMRank Games-6k)",
        files=tuple(
            SourceFile(f"amazon-games/{name}", sha, size, f"{_GAMES}/{name}")
            for name, sha, size in (
                (
                    "Games-6k.item",
                    "be9cea58a8de4f940a20b0ad6b58bad46b22fd6f9dbc82d1a1902e1c62e96ade",
                    837_183,
                ),
                (
                    "Games-6k.test.inter",
                    "b241e4c8a52d2d41530fd073296e8bced4b61753e86ed6c51467c657704bab19",
                    2_501_199,
                ),
                (
                    "Games-6k.valid.inter",
                    "af84810be2c86cc4e7567ebe6355baf78e6e49889ceaa3174769020fd9495f17",
                    2_246_866,
                ),
                (
                    "Games-6k.random",
                    "73b8849e0a45c668f1f4ca20ca3e47a835ac591561268662a290575052a9d26f",
                    3_239_452,
                ),
                ("Games.random", "6164a08c41c6914f3ebfeee13469b5b9b373a4305580421ffe4a1ff2bb24d5ed", 107_950),
            )
        ),
        adapter=_amazon_games,
    ),
}


def get_source(name: str) -> Source:
    """The source called `name`; DataError listing the known ones otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(
            f"unknown data source {name!r}; known sources: {', '.join(sorted(SOURCES))}"
        ) from None


def default_data_dir() -> Path:
    """`$FUSIONRANK_DATA_DIR`, else `../shared/data` when it exists, else `~/.cache/fusionrank/data`."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    shared = Path.cwd().parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "fusionrank" / "data"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(source: Source, data_dir: Path) -> dict[str, Path]:
    """Check every file of `source` under `data_dir` against its SHA-256; return the paths by relpath."""
    paths = {}
    for f in source.files:
        path = data_dir / f.relpath
        if not path.is_file():
            raise DataError(
                f"{path}: missing file of source '{source.name}'. "
                f"Run `fusionrank data pull {source.name} --data-dir {data_dir}` or point --data-dir "
                f"(or ${DATA_DIR_ENV}) at a copy."
            )
        actual = sha256_of(path)
        if actual != f.sha256:
            raise DataError(
                f"{path}: checksum mismatch for source '{source.name}' (expected sha256 {f.sha256}, "
                f"found {actual}); the file is altered or truncated. Re-fetch it with "
                f"`fusionrank data pull {source.name}`."
            )
        paths[f.relpath] = path
    return paths


def load_source(name: str, data_dir: str | Path | None = None) -> Tables:
    """Verify the files of source `name` and turn them into canonical tables."""
    source = get_source(name)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    return source.adapter(verify_files(source, directory))


def pull_source(
    name: str,
    data_dir: str | Path | None = None,
    mirror: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Make every file of source `name` present under `data_dir` with the right checksum.

    A file already there with the right checksum is kept and nothing is fetched. Otherwise it is
    downloaded from its public origin at a pinned commit (or from `mirror`/`$FUSIONRANK_DATA_MIRROR`,
    a base URL holding the same relative paths), checked, and only then moved into place.
    """
    source = get_source(name)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    mirror = mirror or os.environ.get(MIRROR_ENV)
    paths = {}
    for f in source.files:
        target = directory / f.relpath
        if target.is_file() and sha256_of(target) == f.sha256:
            log(f"{target}: present, checksum ok")
            paths[f.relpath] = target
            continue
        url = f"{mirror.rstrip('/')}/{f.relpath}" if mirror else f.url
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except (urllib.error.URLError, OSError) as exc:
                Path(tmp.name).unlink(missing_ok=True)
                raise DataError(f"{url}: download failed ({exc}); {target} left unchanged") from exc
        actual = sha256_of(Path(tmp.name))
        if actual != f.sha256:
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(
                f"{url}: downloaded file has sha256 {actual}, expected {f.sha256}; not saved to {target}"
            )
        Path(tmp.name).replace(target)
        log(f"{target}: fetched from {url}, checksum ok")
        paths[f.relpath] = target
    return paths


def sample(tables: Tables, max_queries: int = 0, max_users: int = 0, seed: int = 0) -> Tables:
    """A smaller dataset for a quick run: `max_queries` whole queries, `max_users` whole user histories.

    Zero keeps everything. The catalog (products) is kept whole, so that retrieval still ranks the real
    catalog; users of the published candidate lists are kept first, so that protocol stays evaluable.
    """
    rng = np.random.default_rng(seed)
    judgments, interactions, candidates = tables.judgments, tables.interactions, tables.eval_candidates
    if judgments is not None and max_queries:
        queries = judgments["query"].unique()
        if len(queries) > max_queries:
            keep = set(rng.choice(queries, size=max_queries, replace=False))
            judgments = judgments[judgments["query"].isin(keep)].reset_index(drop=True)
    if interactions is not None and max_users:
        users = pd.Index(interactions["user_id"].unique())
        if len(users) > max_users:
            first: list[str] = []
            if candidates is not None:
                # the small protocol's users first, then the large one's, each in file order
                ordered = candidates.sort_values("protocol", key=lambda p: p != "llmrank-200", kind="stable")
                first = list(dict.fromkeys(ordered["user_id"]))[:max_users]
            rest = users.difference(pd.Index(first))
            extra = rng.choice(rest.to_numpy(), size=max_users - len(first), replace=False)
            keep = set(first) | set(extra)
            interactions = interactions[interactions["user_id"].isin(keep)].reset_index(drop=True)
            if candidates is not None:
                candidates = candidates[candidates["user_id"].isin(keep)].reset_index(drop=True)
    return Tables(
        products=tables.products,
        interactions=interactions,
        judgments=judgments,
        eval_candidates=candidates,
    )
