"""The served ranker: request handling on a tiny bundle, packaging, and real HTTP against `bentoml serve`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError, DataError, ServiceUnavailable
from fusionrank.serving_logic import (
    MAX_CANDIDATES,
    RankingLogic,
    RankRequest,
    ReconnectingStore,
    ServingSettings,
    online_feature_frame,
    open_online_store,
    retrieve_candidates,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("drill", "hammer", "saw", "ladder", "paint", "brush", "screw", "nail", "glue", "tape")
COLORS = ("red", "blue", "green")
FUSION_SIGNALS = ["s_bm25", "s_popularity", "s_itemknn", "s_bert", "f_popularity_all", "f_user_event_count"]
MODEL_TAG = "fusionrank-ranker:test"


def _products() -> pd.DataFrame:
    ids = [f"p{i}" for i in range(30)]
    titles = [f"{COLORS[i % 3]} {WORDS[i % 10]} model {i}" for i in range(30)]
    return pd.DataFrame({"product_id": ids, "title": titles})


def _interactions() -> pd.DataFrame:
    start = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [
        (f"u{u}", f"p{(3 * u + 2 * step) % 30}", start + pd.Timedelta(days=u + step))
        for u in range(12)
        for step in range(5)
    ]
    return pd.DataFrame(rows, columns=["user_id", "product_id", "event_timestamp"])


class DictStore:
    """An online store held in memory: the lookups `OnlineFeatures` answers, from the tiny tables."""

    def __init__(self, products: pd.DataFrame, interactions: pd.DataFrame) -> None:
        self.counts = interactions["product_id"].value_counts().to_dict()
        self.tokens = dict(zip(products["product_id"], products["title"].str.split().str.len(), strict=True))
        ordered = interactions.sort_values("event_timestamp")
        self.histories = ordered.groupby("user_id")["product_id"].agg(list).to_dict()
        self.calls = 0

    def lookup_batch(self, lookups: Sequence[tuple[str | None, Sequence[str]]]) -> list[tuple[dict, Any]]:
        self.calls += 1
        return [self.lookup(user_id, product_ids) for user_id, product_ids in lookups]

    def lookup(self, user_id: str | None, product_ids: Sequence[str]) -> tuple[dict[str, Any], pd.DataFrame]:
        history = self.histories.get(user_id, [])
        user = {
            "user_event_count": len(history),
            "user_days_since_prev_event": -1.0,
            "user_recent_products": list(reversed(history)),
        }
        table = pd.DataFrame(
            {
                "product_id": pd.Series(list(product_ids), dtype="string"),
                "popularity_all": [int(self.counts.get(p, 0)) for p in product_ids],
                "title_token_count": [int(self.tokens.get(p, 0)) for p in product_ids],
                "category": pd.Series([""] * len(product_ids), dtype="string"),
            }
        )
        return user, table


class DownStore:
    """An online store that cannot be reached."""

    def lookup_batch(self, lookups: Sequence[tuple[str | None, Sequence[str]]]) -> list[tuple[dict, Any]]:
        raise ServiceUnavailable("Redis online store at 127.0.0.1:1: lookup failed (connection refused)")


def _fit_examples(products: pd.DataFrame, interactions: pd.DataFrame) -> list[RankingExample]:
    """Search requests (graded by colour and word) and leave-last-out user requests."""
    titles = dict(zip(products["product_id"], products["title"], strict=True))
    examples = []
    for color in COLORS:
        for word in WORDS[:6]:
            gains = {}
            for pid, title in titles.items():
                if word in title:
                    gains[pid] = 3.0 if color in title else 1.0
            others = [p for p in titles if p not in gains][: 10 - len(gains)]
            examples.append(RankingExample(Context(query=f"{color} {word}"), [*gains, *others], gains))
    ordered = interactions.sort_values("event_timestamp")
    for user, rows in ordered.groupby("user_id"):
        items = list(rows["product_id"])
        target = items[-1]
        others = [p for p in titles if p not in items][:9]
        context = Context(user_id=str(user), history=tuple(items[:-1]))
        examples.append(RankingExample(context, [target, *others], {target: 1.0}))
    return examples


def _offline_features(store: DictStore, examples: Sequence[RankingExample]) -> pd.DataFrame:
    parts = []
    for example in examples:
        user, table = store.lookup(example.context.user_id, example.candidates)
        parts.append(online_feature_frame(example.qid, user, table))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def bundle_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fitted signals, a tiny random BERT and three fusions, saved as the pipeline saves them."""
    from fusionrank.bert import CrossEncoder, make_tiny_bert
    from fusionrank.fusion import fit_cascade, fit_lambdamart, fit_weighted
    from fusionrank.ranker import bert_scores, signal_frame
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.cf import ItemKNNSignal
    from fusionrank.signals.popularity import PopularitySignal

    root = tmp_path_factory.mktemp("bundle-parts")
    products, interactions = _products(), _interactions()
    signals = {
        "bm25": BM25Signal.fit(products),
        "popularity": PopularitySignal.fit(interactions),
        "itemknn": ItemKNNSignal.fit(interactions),
    }
    for name, fitted in signals.items():
        fitted.save(root / "signals" / name)
    bert_dir = make_tiny_bert(root / "bert")
    store = DictStore(products, interactions)
    examples = _fit_examples(products, interactions)
    frame = signal_frame(examples, signals, _offline_features(store, examples))
    titles = dict(zip(products["product_id"], products["title"], strict=True))
    frame["s_bert"] = bert_scores(CrossEncoder.load(bert_dir), examples, titles)
    fusions = {
        "weighted": fit_weighted(frame, FUSION_SIGNALS),
        "cascade": fit_cascade(frame, [s for s in FUSION_SIGNALS if s != "s_bert"], k=5),
        "lambdamart": fit_lambdamart(
            frame, FUSION_SIGNALS, params={"n_estimators": 20, "min_child_samples": 2}
        ),
    }
    for kind, model in fusions.items():
        model.save(root / "fusion" / kind)
    return {
        "root": root,
        "products": products,
        "interactions": interactions,
        "signals": sorted(signals),
        "fusions": sorted(fusions),
        "bert_dir": bert_dir,
        "frame": frame,
    }


def _write_bundle(parts: dict[str, Any], directory: Path, selected: str, feature_store: Path | None) -> Path:
    from fusionrank.ranker import write_bundle

    manifest = {
        "mode": "search",
        "signals": parts["signals"],
        "fusions": parts["fusions"],
        "selected_fusion": selected,
        "fusion_signals": FUSION_SIGNALS,
        "feature_service": "fusionrank_ranker_v1",
        "feature_store": str(feature_store) if feature_store else None,
        "data_hash": "0123456789abcdef0123",
        "git_revision": "test",
    }
    root = parts["root"]
    return write_bundle(
        directory,
        manifest,
        parts["products"],
        root / "signals",
        root / "fusion",
        parts["bert_dir"],
        parts["frame"],
    )


@pytest.fixture(scope="module")
def ranker(bundle_parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    from fusionrank.ranker import Ranker

    directory = _write_bundle(bundle_parts, tmp_path_factory.mktemp("bundle"), "lambdamart", None)
    return Ranker.load(directory)


@pytest.fixture
def store(bundle_parts: dict[str, Any]) -> DictStore:
    return DictStore(bundle_parts["products"], bundle_parts["interactions"])


def _with_fusion(ranker, kind: str):
    return dataclasses.replace(ranker, manifest={**ranker.manifest, "selected_fusion": kind})


def _rank(logic: RankingLogic, **fields: Any):
    return logic.rank_batch([RankRequest(**fields)])[0]


# Requests


def test_a_request_needs_a_query_or_a_user() -> None:
    with pytest.raises(ValidationError, match="give a query, a user_id, or both"):
        RankRequest(k=5)
    assert RankRequest(query="drill").k == 10
    assert RankRequest(user_id="u1").query is None


@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_query_is_refused_with_a_message(query: str) -> None:
    with pytest.raises(ValidationError, match="query is empty"):
        RankRequest(query=query, user_id="u1")


@pytest.mark.parametrize(
    "fields",
    [
        {"query": "drill", "k": 0},
        {"query": "drill", "k": 101},
        {"query": "drill", "k": "10"},
        {"query": 5},
        {"user_id": ""},
        {"query": "drill", "candidates": []},
        {"query": "drill", "candidates": "p1"},
        {"query": "drill", "candidates": [f"p{i}" for i in range(MAX_CANDIDATES + 1)]},
        {"query": "drill", "history": ["p1"] * 201},
        {"query": "drill", "unexpected": 1},
    ],
)
def test_bad_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RankRequest(**fields)


def test_settings_come_from_the_environment_and_bad_values_are_named() -> None:
    settings = ServingSettings.from_env(
        {
            "FUSIONRANK_RETRIEVE_K": "50",
            "FUSIONRANK_ADAPTIVE_BATCHING": "off",
            "FUSIONRANK_FEATURE_REPO": "/x",
        }
    )
    assert (settings.retrieve_k, settings.adaptive_batching, settings.feature_repo) == (50, False, Path("/x"))
    assert ServingSettings.from_env({}) == ServingSettings()
    with pytest.raises(ConfigError, match="FUSIONRANK_ADAPTIVE_BATCHING"):
        ServingSettings.from_env({"FUSIONRANK_ADAPTIVE_BATCHING": "maybe"})
    with pytest.raises(ConfigError, match="retrieve_k"):
        ServingSettings.from_env({"FUSIONRANK_RETRIEVE_K": "0"})
    assert ServingSettings().product_cache_seconds == 60.0
    assert ServingSettings.from_env({"FUSIONRANK_PRODUCT_CACHE_SECONDS": "0"}).product_cache_seconds == 0.0
    with pytest.raises(ConfigError, match="product_cache_seconds"):
        ServingSettings.from_env({"FUSIONRANK_PRODUCT_CACHE_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="not a number"):
        ServingSettings.from_env({"FUSIONRANK_PRODUCT_CACHE_SECONDS": "soon"})


# Ranking


def test_a_query_without_candidates_is_answered_from_retrieval(ranker, store: DictStore) -> None:
    answer = _rank(RankingLogic(ranker, MODEL_TAG, store), query="red drill", k=5)
    assert answer.retrieved
    assert not answer.degraded
    assert not answer.cold_start
    assert [r.rank for r in answer.results] == [1, 2, 3, 4, 5]
    scores = [r.score for r in answer.results]
    assert scores == sorted(scores, reverse=True)
    assert answer.model.tag == MODEL_TAG
    assert answer.model.fusion == "lambdamart"
    for result in answer.results:
        assert set(result.contributions) >= {
            "bm25",
            "popularity",
            "itemknn",
            "bert",
            "f_popularity_all",
            "bias",
        }
        assert sum(result.contributions.values()) == pytest.approx(result.score, abs=1e-6)
    # BM25's hits come first in retrieval: every product whose title holds both words is a candidate
    retrieved = retrieve_candidates(ranker, Context(query="red drill"), 100)
    assert {"p0", "p10", "p20"} <= set(retrieved[:10])


def test_popularity_fills_a_retrieved_list_only_when_it_is_short(ranker, monkeypatch) -> None:
    popularity = ranker.signals["popularity"]
    asked: list[Context] = []
    retrieve = popularity.retrieve
    monkeypatch.setattr(popularity, "retrieve", lambda c, k: asked.append(c) or retrieve(c, k))
    full = retrieve_candidates(ranker, Context(query="red drill"), 3)
    assert len(full) == 3
    assert asked == []  # BM25 filled it: the catalog is not ranked by popularity for nothing
    cold = retrieve_candidates(ranker, Context(user_id="new-user"), 3)
    assert len(cold) == 3
    assert asked == [Context(user_id="new-user")]


def test_candidates_unknown_and_repeated_ids_are_reported_not_fatal(ranker, store: DictStore) -> None:
    logic = RankingLogic(ranker, MODEL_TAG, store)
    answer = _rank(logic, query="saw", user_id="u1", candidates=["p2", "nope", "p12", "p2", "gone"], k=10)
    assert store.calls == 1  # the user and the given candidates in one read
    assert sorted(r.product_id for r in answer.results) == ["p12", "p2"]
    assert answer.unknown_candidates == ["nope", "gone"]
    assert answer.duplicate_candidates == ["p2"]
    assert not answer.retrieved

    nothing_known = _rank(logic, query="saw", candidates=["nope"])
    assert nothing_known.results == []
    assert nothing_known.unknown_candidates == ["nope"]


def test_an_unknown_user_is_a_cold_start_answered_by_popularity(ranker, store: DictStore) -> None:
    answer = _rank(RankingLogic(ranker, MODEL_TAG, store, ServingSettings(retrieve_k=10)), user_id="new-user")
    assert answer.cold_start
    assert not answer.degraded
    assert answer.retrieved
    popular = [pid for pid, _ in ranker.signals["popularity"].retrieve(Context(), 10)]
    assert sorted(r.product_id for r in answer.results) == sorted(popular)


def test_a_known_user_is_ranked_from_the_history_in_the_store(ranker, store: DictStore) -> None:
    logic = RankingLogic(ranker, MODEL_TAG, store, ServingSettings(retrieve_k=5))
    answer = _rank(logic, user_id="u3", k=10)
    assert not answer.cold_start
    assert not answer.degraded
    # item-kNN retrieves from the stored history (oldest first), and leaves the history itself out
    history = tuple(store.histories["u3"])
    expected = retrieve_candidates(ranker, Context(user_id="u3", history=history), 5)
    assert sorted(r.product_id for r in answer.results) == sorted(expected)
    assert not set(expected) & set(history)
    # a history sent with the request replaces the store's
    given = _rank(logic, user_id="u3", history=["p0"], k=10)
    expected = retrieve_candidates(ranker, Context(user_id="u3", history=("p0",)), 5)
    assert sorted(r.product_id for r in given.results) == sorted(expected)


def test_the_store_down_degrades_with_reasons_but_answers(ranker) -> None:
    logic = RankingLogic(ranker, MODEL_TAG, DownStore())
    answer = _rank(logic, query="blue hammer", user_id="u1", k=5)
    assert answer.degraded
    assert len(answer.results) == 5
    assert any(
        "online feature store unavailable" in r and "127.0.0.1:1" in r for r in answer.degraded_reasons
    )
    assert any("history could not be read" in r for r in answer.degraded_reasons)
    without_store = _rank(RankingLogic(ranker, MODEL_TAG, None), query="blue hammer")
    assert without_store.degraded
    assert "no online feature store" in without_store.degraded_reasons[0]


def test_a_missing_store_at_startup_degrades_instead_of_failing(ranker, tmp_path: Path) -> None:
    assert open_online_store(ranker, ServingSettings()) is None
    missing = dataclasses.replace(ranker, manifest={**ranker.manifest, "feature_store": str(tmp_path)})
    logic = RankingLogic(missing, MODEL_TAG, open_online_store(missing, ServingSettings()))
    answer = _rank(logic, query="red saw", k=3)
    assert answer.degraded
    assert len(answer.results) == 3
    assert "feature_store.yaml" in answer.degraded_reasons[0]


def test_a_store_that_fails_to_open_is_retried_after_the_interval(store: DictStore) -> None:
    now = [0.0]
    attempts = []

    def opener() -> DictStore:
        attempts.append(now[0])
        if len(attempts) == 1:
            raise ServiceUnavailable("SQLite online store /x.db: not found")
        return store

    reconnecting = ReconnectingStore(opener, retry_seconds=30.0, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(ServiceUnavailable, match=r"/x\.db"):
            reconnecting.lookup_batch([("u1", ["p1"])])
    assert attempts == [0.0]
    now[0] = 31.0
    ((_user, table),) = reconnecting.lookup_batch([("u1", ["p1"])])
    assert attempts == [0.0, 31.0]
    assert list(table["product_id"]) == ["p1"]


@pytest.mark.parametrize("fusion", ["weighted", "cascade", "lambdamart"])
def test_served_scores_equal_the_offline_scores(ranker, store: DictStore, bundle_parts, fusion: str) -> None:
    """No train/serve skew: the server's scores are those of `Ranker.score(Ranker.frame(...))` offline,
    whatever share of the cores the server gives LightGBM."""
    served_ranker = _with_fusion(ranker, fusion)
    examples = _fit_examples(bundle_parts["products"], bundle_parts["interactions"])[::4]
    offline = served_ranker.score(served_ranker.frame(examples, _offline_features(store, examples)))
    logic = RankingLogic(served_ranker, MODEL_TAG, store, ServingSettings(fusion_threads=2))
    assert served_ranker.fusions[fusion].threads == 2
    requests = [
        RankRequest(
            query=e.context.query,
            user_id=e.context.user_id,
            history=list(e.context.history) if e.context.user_id else None,
            candidates=e.candidates,
            k=100,
        )
        for e in examples
    ]
    for example, answer in zip(examples, logic.rank_batch(requests), strict=True):
        expected = offline[offline["qid"] == example.qid]
        assert [r.product_id for r in answer.results] == list(expected["product_id"])
        np.testing.assert_allclose([r.score for r in answer.results], expected["score"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fusion", ["weighted", "lambdamart"])
def test_retrieved_anonymous_requests_are_scored_with_the_stores_user_defaults(
    ranker, store: DictStore, fusion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query without user or candidates: its retrieved candidates are scored as offline, where a request
    without a user has the user features' defaults (not missing values)."""
    served_ranker = _with_fusion(ranker, fusion)
    logic = RankingLogic(served_ranker, MODEL_TAG, store, ServingSettings(retrieve_k=10))
    queries = ["red drill", "blue hammer", "green saw"]
    given: list[pd.DataFrame] = []
    frame = served_ranker.frame
    monkeypatch.setattr(
        served_ranker,
        "frame",
        lambda examples, features, **kw: given.append(features) or frame(examples, features, **kw),
    )
    answers = logic.rank_batch([RankRequest(query=q, k=10) for q in queries])
    (features,) = given
    assert features["f_user_event_count"].tolist() == [0.0] * len(features)
    assert (features["f_user_days_since_prev_event"] == -1.0).all()
    for query, answer in zip(queries, answers, strict=True):
        assert answer.retrieved
        example = RankingExample(
            Context(query=query), retrieve_candidates(served_ranker, Context(query=query), 10)
        )
        offline = served_ranker.score(served_ranker.frame([example], _offline_features(store, [example])))
        assert [r.product_id for r in answer.results] == list(offline["product_id"])
        np.testing.assert_allclose([r.score for r in answer.results], offline["score"], rtol=1e-4, atol=1e-6)


def test_a_cascade_runs_bert_on_its_shortlist_only(ranker, store: DictStore) -> None:
    cascade = _with_fusion(ranker, "cascade")
    example = RankingExample(Context(query="green saw"), [f"p{i}" for i in range(30)])
    frame = cascade.frame([example], None)
    assert frame["s_bert"].notna().sum() == cascade.fusions["cascade"].k
    full = cascade.frame([example], None, shortlist=False)
    # BERT pads a shorter batch less: its scores agree to float32 noise
    np.testing.assert_allclose(cascade.score(frame)["score"], cascade.score(full)["score"], rtol=1e-4)


def test_a_weighted_fusion_without_bert_weight_runs_bert_only_when_asked_for_every_candidate(ranker) -> None:
    weights = {**ranker.fusions["weighted"].weights, "s_bert": 0.0}
    unweighted = dataclasses.replace(
        _with_fusion(ranker, "weighted"),
        fusions={
            **ranker.fusions,
            "weighted": dataclasses.replace(ranker.fusions["weighted"], weights=weights),
        },
    )
    example = RankingExample(Context(query="green saw"), [f"p{i}" for i in range(12)])
    assert unweighted.frame([example], None, rerank_k=5)["s_bert"].isna().all()
    # shortlist=False (the benchmark measuring each encoder alone) scores every candidate all the same
    assert unweighted.frame([example], None, shortlist=False)["s_bert"].notna().all()


def test_a_zero_budget_neither_runs_bert_nor_ranks_the_rows_to_pick_none(ranker, monkeypatch) -> None:
    from fusionrank import fusion

    example = RankingExample(Context(query="green saw"), [f"p{i}" for i in range(12)])
    expected = ranker.score(ranker.frame([example], None, rerank_k=3).assign(s_bert=np.nan), rerank_k=0)

    def no_shortlist(*args, **kwargs):
        raise AssertionError("rerank_k=0 picked a shortlist")

    # picking a shortlist scores every row with the fusion first: a budget of 0 must not
    monkeypatch.setattr(fusion, "score_candidates", no_shortlist)
    monkeypatch.setattr(ranker, "bert", _Refusing())
    frame = ranker.frame([example], None, rerank_k=0)
    assert frame["s_bert"].isna().all()
    monkeypatch.undo()  # scoring the frame is the next step's work
    pd.testing.assert_frame_equal(ranker.score(frame, rerank_k=0), expected)


class _Refusing:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cross-encoder was used ({name})")


def test_the_warm_up_reads_the_store_and_never_stops_the_server(ranker, store: DictStore, monkeypatch):
    logic = RankingLogic(ranker, "m:1", store)
    assert logic.warm_up() is None
    assert store.calls >= 1  # the store was opened and read before any caller came
    monkeypatch.setattr(logic, "rank_batch", lambda requests: 1 / 0)
    assert logic.warm_up() == "ZeroDivisionError: division by zero"


def test_a_batch_scores_each_request_as_if_alone(ranker, store: DictStore) -> None:
    logic = RankingLogic(ranker, MODEL_TAG, store)
    requests = [
        RankRequest(query="red drill", k=100),
        RankRequest(user_id="u2", k=100),
        RankRequest(query="red drill", candidates=["p0", "p1", "p10"], k=100),  # the same qid as the first
        RankRequest(user_id="stranger", query="paint", k=100),
    ]
    reads = store.calls
    batched = logic.rank_batch(requests)
    # one read for the users and the given candidates, one for the retrieved candidates
    assert store.calls - reads == 2
    for request, answer in zip(requests, batched, strict=True):
        alone = logic.rank_batch([request])[0]
        assert [r.product_id for r in answer.results] == [r.product_id for r in alone.results]
        np.testing.assert_allclose(
            [r.score for r in answer.results], [r.score for r in alone.results], rtol=1e-5, atol=1e-5
        )
    assert len(batched[2].results) == 3


def test_online_feature_frame_keeps_numeric_features_as_f_columns(store: DictStore) -> None:
    user, table = store.lookup("u1", ["p1", "p2"])
    frame = online_feature_frame("q", user, table)
    assert list(frame.columns) == [
        "qid",
        "product_id",
        "f_popularity_all",
        "f_title_token_count",
        "f_user_event_count",
        "f_user_days_since_prev_event",
    ]
    assert frame["f_user_event_count"].tolist() == [5.0, 5.0]


# Packaging


def test_the_bentofile_pins_the_installed_versions() -> None:
    from importlib.metadata import version

    import yaml
    from packaging.requirements import Requirement

    config = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    assert config["python"]["lock_packages"] is False
    for spec in config["python"]["packages"]:
        requirement = Requirement(spec)
        # an exact pin, which a local build label (torch's "+cpu") still satisfies
        assert str(requirement.specifier).startswith("=="), spec
        assert requirement.specifier.contains(version(requirement.name)), (spec, version(requirement.name))


# Real HTTP against `bentoml serve`, and the built Bento


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private BentoML home for this module's stores and servers (never ~/bentoml)."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    home = tmp_path_factory.mktemp("bentoml-home")
    for name in ("models", "bentos", "tmp", "envs"):
        (home / name).mkdir()
    # the container resolves its home once per process: point it here even if bentoml was used before
    providers = {
        BentoMLContainer.bentoml_home: str(home),
        BentoMLContainer.model_store_dir: str(home / "models"),
        BentoMLContainer.bento_store_dir: str(home / "bentos"),
        BentoMLContainer.model_store: ModelStore(str(home / "models")),
        BentoMLContainer.bento_store: BentoStore(str(home / "bentos")),
    }
    for provider, value in providers.items():
        provider.set(value)
    yield home
    for provider in providers:
        provider.reset()


@pytest.fixture(scope="module")
def feature_store(bundle_parts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Feast store (SQLite online store) materialized from the tiny tables."""
    from fusionrank.data.contract import Tables
    from fusionrank.features import materialize_features
    from fusionrank.steps import STORE_INFO

    directory = tmp_path_factory.mktemp("feature-store")
    tables = Tables(products=bundle_parts["products"], interactions=bundle_parts["interactions"])
    info = materialize_features(tables, directory)
    # what the pipeline's features step leaves beside the repository, for the offline feature frames
    (directory / STORE_INFO).write_text(json.dumps(info.to_dict()))
    return directory


@pytest.fixture(scope="module")
def packaged(bundle_parts, feature_store: Path, bentoml_home: Path, tmp_path_factory) -> dict[str, Any]:
    from fusionrank.packaging import save_to_bentoml

    directory = _write_bundle(
        bundle_parts, tmp_path_factory.mktemp("served-bundle"), "lambdamart", feature_store
    )
    manifest = json.loads((directory / "manifest.json").read_text())
    return {"bundle_dir": directory, **save_to_bentoml(directory, manifest)}


class Server:
    """`bentoml serve` in its own process group on a free loopback port."""

    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        from redis_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [str(REPO / ".venv" / "bin" / "bentoml"), "serve", target, "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=REPO / "serving",
            env={**os.environ, **env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bentoml serve not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _serve(target: str, env: dict[str, str], log: Path) -> Iterator[str]:
    server = Server(target, env, log)
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(packaged: dict[str, Any], bentoml_home: Path, tmp_path_factory) -> Iterator[str]:
    """The built Bento served over HTTP, reading the real Feast store its bundle names."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    yield from _serve(packaged["bento"], {"BENTOML_HOME": str(bentoml_home)}, log)


def _post(url: str, body: Any, path: str = "/rank"):
    import httpx

    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


@pytest.mark.slow
def test_packaging_stores_the_bundle_and_pins_it_in_the_bento(packaged: dict[str, Any]) -> None:
    import bentoml

    model = bentoml.models.get(packaged["model"])
    assert model.info.labels["fusion"] == "lambdamart"
    assert model.info.labels["data_hash"] == "0123456789abcdef"
    assert model.info.metadata["feature_service"] == "fusionrank_ranker_v1"
    assert (Path(model.path) / "bundle" / "manifest.json").is_file()
    bento = bentoml.get(packaged["bento"])
    assert [str(m.tag) for m in bento.info.all_models] == [packaged["model"]]
    assert bento.info.args == {"model": packaged["model"]}
    assert (Path(bento.path) / "src" / "fusionrank" / "serving_logic.py").is_file()


@pytest.mark.slow
def test_the_contract_check_passes_on_the_built_bento(packaged: dict[str, Any]) -> None:
    from fusionrank.packaging import contract_check

    result = contract_check(packaged["bento"])
    assert result["passed"], result["failures"]
    assert result["model"] == packaged["model"]
    assert result["requests"] == 4
    assert result["max_batch_score_difference"] <= 1e-4


@pytest.mark.slow
def test_http_health_readiness_and_metrics(served: str) -> None:
    import httpx

    for path in ("/healthz", "/readyz", "/livez"):
        assert httpx.get(served + path, timeout=10).status_code == 200
    assert _post(served, {"query": "red drill"}).status_code == 200
    assert _post(served, {"requests": [{"query": "saw"}]}, path="/rank_batch").status_code == 200
    metrics = httpx.get(served + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "bentoml_service_request_total" in metrics.text
    # /rank's batches (fusionrank.batching) and /rank_batch's (BentoML's dispatcher)
    batches = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.text.splitlines()
        if line.startswith("fusionrank_rank_batch_size_count")
    ]
    assert batches
    assert sum(batches) >= 1  # the /rank above went through the batcher
    assert "bentoml_service_adaptive_batch_size" in metrics.text


@pytest.mark.slow
def test_http_ranks_with_the_features_of_the_store(served: str, packaged: dict[str, Any]) -> None:
    response = _post(served, {"query": "red drill", "user_id": "u3", "k": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert not answer["degraded"]
    assert not answer["cold_start"]
    assert answer["retrieved"]
    assert answer["model"]["tag"] == packaged["model"]
    assert len(answer["results"]) == 5
    first = answer["results"][0]
    assert sum(first["contributions"].values()) == pytest.approx(first["score"], abs=1e-5)
    batch = _post(served, {"requests": [{"query": "saw"}, {"user_id": "u1"}]}, path="/rank_batch")
    assert batch.status_code == 200
    assert len(batch.json()) == 2


@pytest.mark.slow
def test_http_concurrent_requests_get_the_answers_they_get_alone(served: str) -> None:
    """Requests that arrive together are batched in the worker; each still gets its own ranking."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        {"query": "red drill", "k": 5},
        {"user_id": "u3", "k": 5},
        {"query": "glue", "user_id": "u1", "k": 5},
        {"query": "saw", "candidates": ["p8", "missing-1", "p18"]},
    ] * 4
    alone = [_post(served, body).json() for body in bodies[:4]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: _post(served, body), bodies))
    assert [r.status_code for r in together] == [200] * len(bodies)
    for i, response in enumerate(together):
        got, expected = response.json(), alone[i % 4]
        assert [r["product_id"] for r in got["results"]] == [r["product_id"] for r in expected["results"]]
        np.testing.assert_allclose(
            [r["score"] for r in got["results"]], [r["score"] for r in expected["results"]], atol=1e-5
        )
        assert got["unknown_candidates"] == expected["unknown_candidates"]


@pytest.mark.slow
def test_http_scores_equal_the_offline_scores(
    served: str, packaged, feature_store: Path, bundle_parts
) -> None:
    """No train/serve skew: the server's scores are the pipeline's, with features read point-in-time offline
    (`steps.feature_frame`, as evaluation reads them) and candidates, signals and fusion the same."""
    from fusionrank.ranker import Ranker
    from fusionrank.steps import feature_frame

    bundle = Ranker.load(packaged["bundle_dir"])
    examples = [
        e for e in _fit_examples(bundle_parts["products"], bundle_parts["interactions"]) if e.context.query
    ][::3]
    offline = bundle.score(bundle.frame(examples, feature_frame(feature_store, examples, {}, "test")))
    for example in examples:
        response = _post(served, {"query": example.context.query, "candidates": example.candidates, "k": 100})
        assert response.status_code == 200, response.text
        served_scores = {r["product_id"]: r["score"] for r in response.json()["results"]}
        expected = offline[offline["qid"] == example.qid]
        assert list(served_scores) == list(expected["product_id"])
        np.testing.assert_allclose(list(served_scores.values()), expected["score"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"k": 5}, "give a query, a user_id, or both"),
        ({}, "give a query, a user_id, or both"),
        ({"query": ""}, "query is empty"),
        ({"query": "drill", "candidates": [f"p{i}" for i in range(MAX_CANDIDATES + 1)]}, "at most 500"),
        ({"query": "drill", "k": "ten"}, "valid integer"),
        ({"query": "drill", "k": 1000}, "less than or equal to 100"),
        ({"query": 7}, "valid string"),
        ({"query": "drill", "candidates": "p1"}, "valid array"),
        ({"query": "drill", "candidates": [1, 2]}, "valid string"),
        ({"query": "drill", "colour": "red"}, "Extra inputs"),
        ([{"query": "drill"}], "valid"),
        (b"{not json", "Invalid JSON"),
    ],
)
def test_http_bad_requests_get_a_4xx_with_a_clear_message(served: str, body: Any, message: str) -> None:
    response = _post(served, body)
    assert response.status_code == 400, response.text
    assert message in response.text


@pytest.mark.slow
def test_http_unknown_user_and_unknown_candidates(served: str) -> None:
    cold = _post(served, {"user_id": "nobody-knows-me", "k": 3}).json()
    assert cold["cold_start"]
    assert len(cold["results"]) == 3
    assert not cold["degraded"]
    answer = _post(served, {"query": "glue", "candidates": ["p8", "missing-1", "p18"]})
    assert answer.status_code == 200
    assert answer.json()["unknown_candidates"] == ["missing-1"]
    assert {r["product_id"] for r in answer.json()["results"]} == {"p8", "p18"}


@pytest.mark.slow
def test_http_the_store_down_gives_degraded_answers(
    packaged, feature_store: Path, bentoml_home, tmp_path_factory
):
    """A Redis online store nobody listens on: the server starts, answers, and says it is degraded. This
    server runs the model in its worker (FUSIONRANK_MODEL_PROCESS=off), the others in a model process."""
    import yaml
    from redis_server import free_port

    repo = feature_store / "feature_repo"
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis", "connection_string": f"127.0.0.1:{free_port()}"}
    down = repo / "feature_store.down.yaml"
    down.write_text(yaml.safe_dump(config))
    env = {
        "BENTOML_HOME": str(bentoml_home),
        "FUSIONRANK_FEATURE_STORE_YAML": str(down),
        "FUSIONRANK_MODEL_PROCESS": "off",
    }
    log = tmp_path_factory.mktemp("serve-down") / "serve.log"
    body = {"query": "red drill", "user_id": "u3", "k": 4}
    for url in _serve(packaged["bento"], env, log):
        response = _post(url, body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["degraded"]
        assert len(answer["results"]) == 4
        assert any("Redis online store" in reason for reason in answer["degraded_reasons"])
        batched = _post(url, {"requests": [body]}, path="/rank_batch")
        assert batched.status_code == 200, batched.text
        assert [r["product_id"] for r in batched.json()[0]["results"]] == [
            r["product_id"] for r in answer["results"]
        ]
    assert "the model runs in process" not in log.read_text()


@pytest.mark.slow
def test_http_two_workers_answer_as_one_does(served: str, packaged, bentoml_home, tmp_path_factory) -> None:
    """FUSIONRANK_WORKERS=2: two worker processes, each with its own model and torch threads, same answers."""
    bodies = [{"query": "red drill", "user_id": "u3", "k": 4}, {"user_id": "u1", "k": 4}, {"query": "glue"}]
    env = {"BENTOML_HOME": str(bentoml_home), "FUSIONRANK_WORKERS": "2"}
    log = tmp_path_factory.mktemp("serve-workers") / "serve.log"
    for url in _serve(packaged["bento"], env, log):
        for body in bodies:
            one, two = _post(served, body).json(), _post(url, body).json()
            assert [r["product_id"] for r in two["results"]] == [r["product_id"] for r in one["results"]]
            np.testing.assert_allclose(
                [r["score"] for r in two["results"]], [r["score"] for r in one["results"]], atol=1e-5
            )
        # both worker processes started (each one logs its own service start-up; the server is ready with
        # the first), each after its warm-up request, each with a model process of its own
        deadline = time.monotonic() + 180
        while log.read_text().count("Service fusionrank initialized") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert log.read_text().count("Service fusionrank initialized") == 2
        assert log.read_text().count("warm-up request ranked in") == 2
        model_pids = [int(pid) for pid in re.findall(r"the model runs in process (\d+)", log.read_text())]
        assert len(set(model_pids)) == 2
        # Both model processes killed while a request waits in one (stopped first, so that it cannot answer
        # before it dies): that request gets a 503, never a 500 (BentoML answers any 5xx with a generic
        # message; the log says why). Each worker starts a new model process for its next request, and all
        # are answered again.
        for pid in model_pids:
            os.kill(pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as caller:
            pending = caller.submit(_post, url, bodies[0])
            time.sleep(2.0)
            for pid in model_pids:
                os.kill(pid, signal.SIGKILL)
            caught = pending.result()
        assert caught.status_code == 503, caught.text
        assert "the model process stopped while it ranked this request" in log.read_text()
        statuses = []
        deadline = time.monotonic() + 120
        while statuses[-6:] != [200] * 6 and time.monotonic() < deadline:
            response = _post(url, bodies[0])
            statuses.append(response.status_code)
            assert response.status_code in (200, 503), response.text
        assert statuses[-6:] == [200] * 6, statuses
        again, one = response.json()["results"], _post(served, bodies[0]).json()["results"]
        assert [r["product_id"] for r in again] == [r["product_id"] for r in one]
        assert "a new one starts (restart 1)" in log.read_text()


def test_a_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    from fusionrank.packaging import save_to_bentoml

    with pytest.raises(DataError, match="not a ranker bundle"):
        save_to_bentoml(tmp_path, {})


def test_a_long_query_is_truncated_and_said_so_and_stop_words_still_get_an_answer(ranker) -> None:
    logic = RankingLogic(ranker, "m:1", None)
    long = _rank(logic, query=" ".join(["cordless drill with battery"] * 30), k=3)
    assert long.notes
    assert "query truncated" in long.notes[0]
    assert len(long.results) == 3
    short = _rank(logic, query="drill", k=3)
    assert short.notes == []
    # a query of stop words and symbols matches no BM25 term: popularity still answers, no error
    stop = _rank(logic, query="the of and ?!", k=3)
    assert len(stop.results) == 3
    assert stop.retrieved
