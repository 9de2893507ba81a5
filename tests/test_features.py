"""Feature store: point-in-time feature computation, Feast apply/materialize, training frames, lookups."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from redis_server import free_port, running_redis

from fusionrank.data.contract import Tables
from fusionrank.data.sources import default_data_dir, load_source, sample
from fusionrank.errors import ConfigError, DataError, ServiceUnavailable
from fusionrank.features import (
    FEATURE_DEFAULTS,
    HISTORY_LENGTH,
    MAX_LOOKUP_PRODUCTS,
    STATIC_SNAPSHOT_TIME,
    FeatureStoreInfo,
    OnlineFeatures,
    ProductCache,
    materialize_features,
    product_feature_frame,
    training_frame,
    user_feature_frame,
)

DAY = pd.Timedelta(days=1)
T0 = pd.Timestamp("2020-01-01T00:00:00Z")
PRODUCT_FEATURES = [
    "popularity_7d",
    "popularity_30d",
    "popularity_all",
    "judged_query_count",
    "title_char_count",
    "title_token_count",
    "category",
    "brand",
]
USER_FEATURES = ["user_event_count", "user_days_since_prev_event", "user_recent_products"]


def _interactions(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, product, day offset from T0) rows in canonical form."""
    return pd.DataFrame(
        {
            "user_id": pd.array([r[0] for r in rows], dtype="string"),
            "product_id": pd.array([r[1] for r in rows], dtype="string"),
            "event_timestamp": pd.Series([T0 + r[2] * DAY for r in rows]).astype("datetime64[us, UTC]"),
        }
    )


def _products(ids: list[str], **extra: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"product_id": ids, "title": [f"title of {i}" for i in ids], **extra})
    return frame.astype("string")


# --- computation (pandas only, fast) -------------------------------------------------------------------


def test_product_popularity_counts_only_events_in_the_trailing_window() -> None:
    events = _interactions([("u", "a", 0), ("v", "a", 1), ("w", "a", 10), ("u", "b", 5), ("v", "a", 40)])
    rows = product_feature_frame(_products(["a", "b", "c"]), events)

    a = rows[rows["product_id"] == "a"].set_index("event_timestamp")
    # a day-0 event leaves the 7-day window on day 7 and the 30-day one on day 30
    assert a.loc[T0 + 7 * DAY, ["popularity_7d", "popularity_30d", "popularity_all"]].tolist() == [1, 2, 2]
    assert a.loc[T0 + 10 * DAY, ["popularity_7d", "popularity_30d", "popularity_all"]].tolist() == [1, 3, 3]
    assert a.loc[T0 + 30 * DAY, ["popularity_7d", "popularity_30d", "popularity_all"]].tolist() == [0, 2, 3]
    assert a.loc[T0 + 40 * DAY, ["popularity_7d", "popularity_30d", "popularity_all"]].tolist() == [1, 1, 4]
    # no row after the last event: the online store holds the state at the end of the data
    assert rows["event_timestamp"].max() == T0 + 40 * DAY
    # a catalog product without events has its catalog row at the first event time
    c = rows[rows["product_id"] == "c"]
    assert c["event_timestamp"].tolist() == [T0]
    assert c[["popularity_all", "title_token_count", "title_char_count"]].iloc[0].tolist() == [0, 3, 10]
    assert not rows.duplicated(["product_id", "event_timestamp"]).any()


def test_product_rows_never_count_later_events() -> None:
    rng = np.random.default_rng(3)
    events = _interactions([(f"u{i}", f"p{rng.integers(5)}", int(rng.integers(60))) for i in range(400)])
    rows = product_feature_frame(_products([f"p{i}" for i in range(5)]), events)
    times = {p: sorted(g["event_timestamp"]) for p, g in events.groupby("product_id")}
    for row in rows.itertuples():
        seen = times[row.product_id]
        upto = bisect.bisect_right(seen, row.event_timestamp)
        assert row.popularity_all == upto
        assert row.popularity_7d == upto - bisect.bisect_right(seen, row.event_timestamp - 7 * DAY)
        assert row.popularity_30d == upto - bisect.bisect_right(seen, row.event_timestamp - 30 * DAY)


def test_static_product_features_use_catalog_columns_and_train_judgments_only() -> None:
    products = _products(["a", "b"], category=["games", "tools"], brand=["acme", "bolt"])
    train = pd.DataFrame({"query": ["q1", "q2", "q2"], "product_id": ["a", "a", "a"], "relevance": 3.0})
    rows = product_feature_frame(products, None, train)
    assert rows["event_timestamp"].eq(STATIC_SNAPSHOT_TIME).all()
    by_id = rows.set_index("product_id")
    assert by_id.loc["a", "judged_query_count"] == 2
    assert by_id.loc["b", "judged_query_count"] == 0
    assert by_id.loc["b", ["category", "brand"]].tolist() == ["tools", "bolt"]


def test_the_online_history_is_as_long_as_sasrec_reads() -> None:
    from fusionrank.signals.sequential import SASRecConfig

    assert SASRecConfig().max_length <= HISTORY_LENGTH


def test_user_history_is_newest_first_truncated_and_per_time() -> None:
    events = _interactions([("u", "a", 0), ("u", "b", 2), ("u", "c", 2), ("u", "d", 5), ("v", "a", 1)])
    rows = user_feature_frame(events, history_length=2)
    u = rows[rows["user_id"] == "u"].reset_index(drop=True)
    # the two events on day 2 make one row, the state after both
    assert u["event_timestamp"].tolist() == [T0, T0 + 2 * DAY, T0 + 5 * DAY]
    assert u["user_event_count"].tolist() == [1, 3, 4]
    assert u["user_days_since_prev_event"].tolist() == [-1.0, 2.0, 3.0]
    assert u["user_recent_products"].tolist() == [["a"], ["c", "b"], ["d", "c"]]
    assert rows[rows["user_id"] == "v"]["user_recent_products"].tolist() == [["a"]]


def test_search_data_needs_train_judgments(tmp_path: Path) -> None:
    tables = Tables(
        products=_products(["a"]),
        judgments=pd.DataFrame({"query": ["q"], "product_id": ["a"], "relevance": [3.0]}),
    )
    with pytest.raises(ConfigError, match="train_judgments"):
        materialize_features(tables, tmp_path)


def test_cluster_environment_needs_its_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSIONRANK_REDIS", raising=False)
    tables = Tables(products=_products(["a"]), interactions=_interactions([("u", "a", 0)]))
    with pytest.raises(ConfigError, match="FUSIONRANK_REDIS"):
        materialize_features(tables, tmp_path, env="cluster")


# --- Feast on real data (one module's worth of stores) -------------------------------------------------


def _require_data(name: str) -> None:
    if not (default_data_dir() / name).is_dir():
        pytest.skip(f"real data {default_data_dir() / name} absent (see ../shared/data/README.md)")


@pytest.fixture(scope="module")
def games() -> Tables:
    _require_data("amazon-games")
    tables = sample(load_source("amazon-games"), max_users=300, seed=0)
    assert tables.interactions is not None
    # the sample's products and 200 catalog products besides (materializing 17k products costs seconds)
    keep = tables.products["product_id"].isin(tables.interactions["product_id"])
    keep |= tables.products.index < 200
    return Tables(products=tables.products[keep].reset_index(drop=True), interactions=tables.interactions)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_redis(tmp_path_factory.mktemp("redis")) as port:
        yield port


@pytest.fixture(scope="module")
def games_stores(
    games: Tables, redis_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, FeatureStoreInfo]]:
    """The same Games sample materialized into SQLite (local) and Redis (cluster yaml, real server)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FUSIONRANK_REDIS", f"127.0.0.1:{redis_port}")
        env.setenv("FUSIONRANK_FEAST_REGISTRY", str(tmp_path_factory.mktemp("shared") / "registry.db"))
        env.setenv("FUSIONRANK_FEAST_OFFLINE_STORE", "{type: file}")
        yield {
            "local": materialize_features(games, tmp_path_factory.mktemp("local")),
            "cluster": materialize_features(games, tmp_path_factory.mktemp("cluster"), env="cluster"),
        }


@pytest.fixture(scope="module")
def online(games_stores: dict[str, FeatureStoreInfo]) -> dict[str, OnlineFeatures]:
    return {env: OnlineFeatures.from_info(info) for env, info in games_stores.items()}


@pytest.fixture(scope="module")
def homedepot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tables, pd.DataFrame, FeatureStoreInfo]:
    """A Home Depot sample (judged products only), its training judgments and its local store."""
    _require_data("homedepot")
    tables = sample(load_source("homedepot"), max_queries=200, seed=0)
    assert tables.judgments is not None
    tables = Tables(
        products=tables.products[tables.products["product_id"].isin(tables.judgments["product_id"])],
        judgments=tables.judgments,
    )
    queries = tables.judgments["query"].drop_duplicates()
    train = tables.judgments[tables.judgments["query"].isin(queries.iloc[:150])]
    info = materialize_features(tables, tmp_path_factory.mktemp("hd"), train_judgments=train)
    return tables, train, info


@pytest.mark.slow
def test_materialize_applies_the_service_and_reports_the_run(
    games: Tables, games_stores: dict[str, FeatureStoreInfo]
) -> None:
    info = games_stores["local"]
    assert info.feature_service == "fusionrank_ranker_v1"
    assert list(info.feature_names) == PRODUCT_FEATURES + USER_FEATURES
    assert info.as_of == pd.Timestamp("2018-10-01T00:00:00Z")
    assert info.entity_counts == {"product_features": len(games.products), "user_features": 300}
    assert info.row_counts["user_features"] == len(games.interactions)
    assert (info.repo_path / "definitions.py").is_file()
    assert (info.repo_path / "data" / "product_features.parquet").is_file()
    text = info.yaml_path.read_text()
    assert f"{info.repo_path}/data/registry.db" in text
    assert f"{info.repo_path}/data/online_store.db" in text
    assert "${FUSIONRANK_REDIS}" in games_stores["cluster"].yaml_path.read_text()
    assert FeatureStoreInfo.from_dict(info.to_dict()) == info


@pytest.mark.slow
def test_training_frame_is_point_in_time_correct(
    games: Tables, games_stores: dict[str, FeatureStoreInfo]
) -> None:
    events = games.interactions
    assert events is not None
    # every interaction, shuffled, with duplicates and a custom index: all must come back in order
    rows = events.sample(frac=1.0, random_state=1)
    rows = pd.concat([rows, rows.iloc[:50]])[["user_id", "product_id", "event_timestamp"]]
    rows.index = pd.Index([f"r{i}" for i in range(len(rows))])
    frame = training_frame(games_stores["local"], rows)
    assert frame.index.equals(rows.index)
    assert frame[["user_id", "product_id", "event_timestamp"]].equals(rows)

    # the expected values straight from the raw events, by a different route than the library's
    ordered = events.sort_values("event_timestamp", kind="stable")
    by_user = {
        u: (g["event_timestamp"].tolist(), g["product_id"].tolist()) for u, g in ordered.groupby("user_id")
    }
    by_product = {p: sorted(g["event_timestamp"]) for p, g in events.groupby("product_id")}
    for row in frame.itertuples():
        times, products = by_user[row.user_id]
        upto = bisect.bisect_right(times, row.event_timestamp)
        assert row.user_recent_products == products[:upto][::-1][:HISTORY_LENGTH]
        assert row.user_event_count == upto
        seen = by_product[row.product_id]
        upto = bisect.bisect_right(seen, row.event_timestamp)
        assert row.popularity_all == upto
        assert row.popularity_7d == upto - bisect.bisect_right(seen, row.event_timestamp - 7 * DAY)

    # asked a moment before an event, the history does not hold that event yet
    just_before = rows.assign(event_timestamp=rows["event_timestamp"] - pd.Timedelta(microseconds=1))
    earlier = training_frame(games_stores["local"], just_before)
    assert (earlier["user_event_count"] == frame["user_event_count"] - 1).all()
    # (one older product moves up into a full 20-item history)
    pairs = zip(earlier["user_recent_products"], frame["user_recent_products"], strict=True)
    assert all(before[: len(after) - 1] == after[1:] for before, after in pairs)


@pytest.mark.slow
def test_training_frame_fills_defaults(games_stores: dict[str, FeatureStoreInfo]) -> None:
    rows = pd.DataFrame(
        {
            "user_id": pd.array(["nobody", "0", None], dtype="string"),
            "product_id": pd.array(["no-such-product", "0", "1"], dtype="string"),
            # the second row asks before any feature row exists
            "event_timestamp": pd.to_datetime(["2018-10-01", "2000-01-01", "2018-10-01"], utc=True),
        }
    )
    frame = training_frame(games_stores["local"], rows)
    for name in PRODUCT_FEATURES[:6] + USER_FEATURES:
        default = FEATURE_DEFAULTS[name]
        expected = list(default) if isinstance(default, tuple) else default
        assert frame.loc[0, name] == expected, name
        assert frame.loc[1, name] == expected, name
    assert frame.loc[2, "user_recent_products"] == []
    assert frame.loc[2, "title_char_count"] > 0
    assert frame["popularity_all"].dtype == "int64"
    assert frame["category"].dtype == "string"


@pytest.mark.slow
def test_search_frames_get_train_only_judged_counts_and_user_defaults(
    homedepot: tuple[Tables, pd.DataFrame, FeatureStoreInfo],
) -> None:
    tables, train, info = homedepot
    assert info.as_of == STATIC_SNAPSHOT_TIME
    rows = tables.judgments[["query", "product_id"]].assign(event_timestamp=info.as_of)
    frame = training_frame(info, rows)
    assert frame.index.equals(rows.index)
    expected = frame["product_id"].map(train.groupby("product_id")["query"].nunique()).fillna(0)
    assert (frame["judged_query_count"] == expected).all()
    # products judged only by held-out queries exist, and their count is 0: test queries do not leak
    held_out_only = ~frame["product_id"].isin(train["product_id"])
    assert held_out_only.any()
    assert (frame.loc[held_out_only, "judged_query_count"] == 0).all()
    assert (frame["user_event_count"] == 0).all()
    assert (frame["user_recent_products"].str.len() == 0).all()

    user, products = OnlineFeatures.from_info(info).lookup(None, rows["product_id"].iloc[:3].tolist())
    assert user == {"user_event_count": 0, "user_days_since_prev_event": -1.0, "user_recent_products": []}
    assert products["judged_query_count"].tolist() == frame["judged_query_count"].iloc[:3].tolist()


@pytest.mark.slow
def test_sqlite_and_redis_lookups_agree(games: Tables, online: dict[str, OnlineFeatures]) -> None:
    users = [*games.interactions["user_id"].drop_duplicates().iloc[:5], "no-such-user", None]
    popular = games.interactions["product_id"].value_counts().index[:60].tolist()
    products = [*popular, *games.products["product_id"].iloc[:30], "no-such-product", popular[0]]
    for user_id in users:
        local_user, local_products = online["local"].lookup(user_id, products)
        redis_user, redis_products = online["cluster"].lookup(user_id, products)
        assert local_user == redis_user
        pd.testing.assert_frame_equal(local_products, redis_products)
    assert local_products["product_id"].tolist() == products
    assert local_products["popularity_all"].iloc[0] > 0
    # a repeated id gets the same row again, read once
    assert local_products.iloc[-1].tolist() == local_products.iloc[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("env", ["local", "cluster"])
def test_lookup_matches_feast_online_api_and_latest_state(
    games: Tables, online: dict[str, OnlineFeatures], env: str
) -> None:
    """The lookup reads the store itself (SQLite per view, Redis in one pipeline): Feast's API agrees."""
    store = online[env]
    events = games.interactions.sort_values("event_timestamp", kind="stable")
    user_id = events["user_id"].iloc[-1]
    products = events["product_id"].drop_duplicates().iloc[:100].tolist()
    user, table = store.lookup(user_id, products)

    history = events[events["user_id"] == user_id]["product_id"].tolist()
    assert user["user_event_count"] == len(history)
    assert user["user_recent_products"] == history[::-1][:HISTORY_LENGTH]
    feast_user = store.store.get_online_features(
        features=[f"user_features:{n}" for n in USER_FEATURES], entity_rows=[{"user_id": user_id}]
    ).to_dict()
    assert {n: feast_user[n][0] for n in USER_FEATURES} == user
    feast_products = store.store.get_online_features(
        features=[f"product_features:{n}" for n in PRODUCT_FEATURES], entity_rows={"product_id": products}
    ).to_df()
    pd.testing.assert_frame_equal(
        table[PRODUCT_FEATURES], feast_products[PRODUCT_FEATURES].astype(table[PRODUCT_FEATURES].dtypes)
    )


@pytest.mark.slow
@pytest.mark.parametrize("env", ["local", "cluster"])
def test_cached_product_rows_answer_as_the_store_does(
    games: Tables, games_stores: dict[str, FeatureStoreInfo], env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the product cache, a second lookup reads only the user and the products not seen before, and
    answers exactly what an uncached lookup answers (repeated and unknown ids included)."""
    plain = OnlineFeatures.from_info(games_stores[env])
    cached = OnlineFeatures.from_info(games_stores[env], product_cache_seconds=60)
    user_id = games.interactions["user_id"].iloc[0]
    popular = games.interactions["product_id"].value_counts().index[:40].tolist()
    first = [*popular[:30], "no-such-product"]
    second = [popular[35], *popular[:20], "no-such-product", popular[35], popular[0]]
    cached.lookup(None, first)
    reads: list[list[str]] = []
    reader = cached._reader.read
    monkeypatch.setattr(
        cached._reader,
        "read",
        lambda requests: reads.append([list(r[2]) for r in requests]) or reader(requests),
    )
    for user in (user_id, None):
        assert cached.lookup(user, second)[0] == plain.lookup(user, second)[0]
        pd.testing.assert_frame_equal(cached.lookup(user, second)[1], plain.lookup(user, second)[1])
    # the first lookup read popular[35]; later ones read the user only, and an anonymous one nothing
    assert reads[0] == [[user_id], [popular[35]]]
    assert reads[1:] == [[[user_id], []]]
    assert cached.product_cache.hits > 0


@pytest.mark.slow
def test_a_batch_lookup_reads_once_and_answers_as_single_lookups(
    games: Tables, games_stores: dict[str, FeatureStoreInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    features = OnlineFeatures.from_info(games_stores["local"])
    users = games.interactions["user_id"].drop_duplicates().iloc[:3].tolist()
    popular = games.interactions["product_id"].value_counts().index[:50].tolist()
    lookups = [
        (users[0], popular[:20]),
        (None, [*popular[10:40], "no-such-product", popular[10]]),
        (users[1], []),
        (users[0], popular[45:]),  # the same user twice
        ("no-such-user", popular[:5]),
    ]
    reads: list[list[list[str]]] = []
    reader = features._reader.read
    monkeypatch.setattr(
        features._reader,
        "read",
        lambda requests: reads.append([list(r[2]) for r in requests]) or reader(requests),
    )
    answers = features.lookup_batch(lookups)
    # each distinct user and product once, in one read
    assert reads == [
        [[users[0], users[1], "no-such-user"], list(dict.fromkeys(p for _, ids in lookups for p in ids))]
    ]
    for (user_id, product_ids), (user, columns) in zip(lookups, answers, strict=True):
        alone_user, alone = features.lookup(user_id, product_ids)
        assert user == alone_user
        pd.testing.assert_frame_equal(pd.DataFrame({"product_id": alone["product_id"], **columns}), alone)


def test_latest_user_histories_are_the_histories_the_server_reads(
    games: Tables, games_stores: dict[str, FeatureStoreInfo]
) -> None:
    from fusionrank.features import latest_user_histories
    from fusionrank.serving_logic import RankRequest, _history

    info = games_stores["local"]
    histories = latest_user_histories(info)
    assert len(histories) == games.interactions["user_id"].nunique()
    last_event = games.interactions.groupby("user_id")["event_timestamp"].max()
    times = [last_event[user] for user, _ in histories]
    assert times == sorted(times, reverse=True)  # the most recently active first
    features = OnlineFeatures.from_info(info)
    for user, history in histories[:5] + histories[-5:]:
        stored, _ = features.lookup(user, [])
        assert history == _history(RankRequest(user_id=user, k=10), stored)
    assert latest_user_histories(info, max_users=3) == histories[:3]
    assert latest_user_histories(info, max_users=0) == []


def test_a_served_request_reads_the_vector_the_pipeline_computed_for_its_stored_history(
    games: Tables, games_stores: dict[str, FeatureStoreInfo], tmp_path: Path
) -> None:
    from fusionrank.bert import make_tiny_bert
    from fusionrank.biencoder import BiEncoder
    from fusionrank.context import Context
    from fusionrank.serving_logic import RankRequest, _history
    from fusionrank.signals.dense import DenseSignal
    from fusionrank.steps import precompute_store_histories

    dense = DenseSignal.build(BiEncoder.load(make_tiny_bert(tmp_path / "bert")), games.products)
    info = games_stores["local"]
    kept = precompute_store_histories(dense, info)
    users = games.interactions["user_id"].astype(str).unique()
    stored = OnlineFeatures.from_info(info)
    contexts = [
        Context(user_id=u, history=_history(RankRequest(user_id=u), stored.lookup(u, [])[0])) for u in users
    ]
    assert kept == len({t for t in dense.context_texts(contexts) if t.strip()})
    encoded: list[list[str]] = []
    encode = dense.encoder.encode
    dense.encoder.encode = lambda texts, *a, **k: encoded.append(list(texts)) or encode(texts, *a, **k)
    vectors = dense.context_vectors(contexts[:5])
    assert encoded == []  # the server's contexts of stored histories are the ones computed
    np.testing.assert_allclose(vectors, encode(dense.context_texts(contexts[:5])), atol=1e-5)


def test_the_product_cache_expires_rows_and_keeps_the_most_recent() -> None:
    now = [0.0]
    cache = ProductCache(10.0, max_products=2, clock=lambda: now[0])
    cache.put(["a", "b"], [(1,), (2,)])
    assert cache.get(["a", "b", "c"]) == ({"a": (1,), "b": (2,)}, ["c"])
    now[0] = 10.5  # older than 10 s: read again
    assert cache.get(["a"]) == ({}, ["a"])
    cache.put(["a"], [(3,)])
    cache.put(["c"], [(4,)])  # a third row: the least recently written ("b") leaves
    assert cache.get(["a", "b", "c"]) == ({"a": (3,), "c": (4,)}, ["b"])
    with pytest.raises(ConfigError):
        ProductCache(0)


@pytest.mark.slow
def test_lookup_defaults_and_limits(online: dict[str, OnlineFeatures]) -> None:
    user, table = online["cluster"].lookup("no-such-user", ["no-such-product"])
    assert user == {"user_event_count": 0, "user_days_since_prev_event": -1.0, "user_recent_products": []}
    assert table.iloc[0].tolist() == ["no-such-product", 0, 0, 0, 0, 0, 0, "", ""]
    user, table = online["local"].lookup(None, [])
    assert user["user_recent_products"] == []
    assert table.empty
    with pytest.raises(DataError, match=str(MAX_LOOKUP_PRODUCTS)):
        online["local"].lookup(None, ["p"] * (MAX_LOOKUP_PRODUCTS + 1))


@pytest.mark.slow
def test_redis_down_is_service_unavailable_and_fast(
    games_stores: dict[str, FeatureStoreInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = free_port()
    monkeypatch.setenv("FUSIONRANK_REDIS", f"127.0.0.1:{dead}")
    features = OnlineFeatures.from_info(games_stores["cluster"])
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=f"Redis online store at 127.0.0.1:{dead}"):
        features.lookup("0", ["0", "1"])
    # redis-py's default retries take 4-10 s; the server needs the answer well within a request
    assert time.monotonic() - started < 3


@pytest.mark.slow
def test_missing_stores_are_service_unavailable(
    games_stores: dict[str, FeatureStoreInfo], tmp_path: Path
) -> None:
    with pytest.raises(ServiceUnavailable, match=r"feature_store\.yaml"):
        OnlineFeatures(tmp_path)
    info = games_stores["local"]
    moved = tmp_path / "feature_store.yaml"
    text = info.yaml_path.read_text()
    moved.write_text(text.replace(str(info.repo_path / "data" / "online_store.db"), "/nope.db"))
    with pytest.raises(ServiceUnavailable, match=r"SQLite online store /nope\.db"):
        OnlineFeatures(info.repo_path, yaml_path=moved)
    moved.write_text(text.replace(str(info.repo_path / "data" / "registry.db"), str(tmp_path / "no.db")))
    with pytest.raises(ServiceUnavailable, match=r"feature registry .*no\.db: not found"):
        OnlineFeatures(info.repo_path, yaml_path=moved)
    assert not (tmp_path / "no.db").exists()


@pytest.mark.slow
def test_unknown_feature_service_is_a_config_error(
    games_stores: dict[str, FeatureStoreInfo], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="fusionrank_ranker_v9"):
        OnlineFeatures(games_stores["local"].repo_path, "fusionrank_ranker_v9")
    tables = Tables(products=_products(["a"]), interactions=_interactions([("u", "a", 0)]))
    with pytest.raises(ConfigError, match="declared: \\['fusionrank_ranker_v1'\\]"):
        materialize_features(tables, tmp_path, feature_service="fusionrank_ranker_v9")


@pytest.mark.slow
def test_a_later_run_on_a_shared_registry_materializes_only_what_is_new(
    redis_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUSIONRANK_REDIS", f"127.0.0.1:{redis_port}")
    monkeypatch.setenv("FUSIONRANK_FEAST_REGISTRY", str(tmp_path / "shared" / "registry.db"))
    monkeypatch.setenv("FUSIONRANK_FEAST_OFFLINE_STORE", "{type: file}")
    products = _products(["inc-a", "inc-b", "inc-c"])
    first = [("inc-u", "inc-a", 0), ("inc-u", "inc-b", 1), ("inc-v", "inc-a", 1)]
    materialize_features(Tables(products, _interactions(first)), tmp_path / "run1", env="cluster")
    later = [*first, ("inc-u", "inc-c", 3)]
    info = materialize_features(Tables(products, _interactions(later)), tmp_path / "run2", env="cluster")

    from feast import FeatureStore

    store = FeatureStore(repo_path=str(info.repo_path), fs_yaml_file=info.yaml_path)
    intervals = {v.name: v.materialization_intervals for v in store.list_feature_views()}
    # the first run materialized everything; the second only the interval after the first run's end
    assert intervals["user_features"] == [(T0, T0 + DAY), (T0 + DAY, T0 + 3 * DAY)]
    user, table = OnlineFeatures.from_info(info).lookup("inc-u", ["inc-a", "inc-c"])
    assert user["user_recent_products"] == ["inc-c", "inc-b", "inc-a"]
    # inc-a has no row after the first run's end: its value is the one the first run wrote
    assert table["popularity_all"].tolist() == [2, 1]


def test_product_embeddings_round_trip_through_the_online_store(
    homedepot: tuple[Tables, pd.DataFrame, FeatureStoreInfo],
) -> None:
    from feast import FeatureStore

    from fusionrank.features import write_product_embeddings

    tables, _, info = homedepot
    ids = tables.products["product_id"].astype(str).iloc[:5].tolist()
    vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    written = write_product_embeddings(info, ids, vectors, "dense-test")
    assert written["rows"] == 5
    assert (info.repo_path / "data" / "product_embedding.parquet").is_file()
    store = FeatureStore(repo_path=str(info.repo_path), fs_yaml_file=info.yaml_path)
    got = store.get_online_features(
        features=["product_embedding:embedding", "product_embedding:embedding_model"],
        entity_rows=[{"product_id": pid} for pid in [*ids[:2], "no-such-product"]],
    ).to_dict()
    assert np.allclose(np.array(got["embedding"][:2], dtype=np.float32), vectors[:2])
    assert got["embedding_model"][:2] == ["dense-test", "dense-test"]
    assert got["embedding"][2] is None
    with pytest.raises(DataError, match="5 product ids but 4 embeddings"):
        write_product_embeddings(info, ids, vectors[:4], "dense-test")


def test_the_redis_connection_is_composed_from_address_and_password() -> None:
    from fusionrank.features import _compose_redis_connection

    env = {"FUSIONRANK_REDIS_ADDRESS": "fusionrank-redis:6379", "FUSIONRANK_REDIS_PASSWORD": "s3cret"}
    _compose_redis_connection(env)
    assert env["FUSIONRANK_REDIS"] == "fusionrank-redis:6379,password=s3cret"
    given = {"FUSIONRANK_REDIS": "other:1", "FUSIONRANK_REDIS_ADDRESS": "x:2"}
    _compose_redis_connection(given)
    assert given["FUSIONRANK_REDIS"] == "other:1"
    bare = {"FUSIONRANK_REDIS_ADDRESS": "r:6379"}
    _compose_redis_connection(bare)
    assert bare["FUSIONRANK_REDIS"] == "r:6379"
