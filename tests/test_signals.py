"""Each traditional signal on tiny data with answers computed by hand, and its save/load round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.context import Context
from fusionrank.errors import DataError
from fusionrank.signals import (
    BM25Signal,
    EASESignal,
    FallbackRetriever,
    ItemKNNSignal,
    PopularitySignal,
    Signal,
    load_signal,
)


def _events(sequences: dict[str, list[str]], start: str = "2024-01-01") -> pd.DataFrame:
    rows = [
        (user, pid, pd.Timestamp(start, tz="UTC") + pd.Timedelta(days=day))
        for user, items in sequences.items()
        for day, pid in enumerate(items)
    ]
    return pd.DataFrame(rows, columns=["user_id", "product_id", "event_timestamp"])


def _roundtrip(signal: Signal, tmp_path: Path, context: Context, candidates: list[str]) -> None:
    loaded = load_signal(signal.save(tmp_path / signal.name))
    assert type(loaded) is type(signal)
    assert loaded.name == signal.name
    np.testing.assert_array_equal(loaded.score(context, candidates), signal.score(context, candidates))


def test_popularity_counts_training_events_and_defaults_unknown_products_to_zero(tmp_path: Path) -> None:
    popularity = PopularitySignal.fit(_events({"u1": ["a", "b"], "u2": ["a"], "u3": ["a", "c"]}))
    scores = popularity.score(Context(user_id="u9"), ["a", "b", "c", "never-seen"])
    assert scores.dtype == np.float32
    assert scores.tolist() == [3.0, 1.0, 1.0, 0.0]
    # history is excluded from retrieval; equal counts are ordered by product id
    assert popularity.retrieve(Context(user_id="u1", history=("a",)), 5) == [("b", 1.0), ("c", 1.0)]
    _roundtrip(popularity, tmp_path, Context(), ["c", "a", "zz"])


def test_popularity_trailing_window_counts_only_recent_events() -> None:
    # events fall on days 0..3 of each user; the last training event is on day 3
    events = _events({"u1": ["old", "old", "new", "new"], "u2": ["old", "new"]})
    window = PopularitySignal.fit(events, window_days=2)
    assert window.name == "popularity_2d"
    # the window (day 1, day 3] holds u1's days 2 and 3 only
    assert window.score(Context(), ["old", "new"]).tolist() == [0.0, 2.0]
    assert PopularitySignal.fit(events).score(Context(), ["old", "new"]).tolist() == [3.0, 3.0]


def test_popularity_from_judgments_counts_distinct_training_queries() -> None:
    judgments = pd.DataFrame(
        {
            "query": ["drill", "drill", "cordless drill", "saw"],
            "product_id": ["p1", "p1", "p1", "p2"],
            "relevance": [3.0, 3.0, 2.0, 1.0],
        }
    )
    popularity = PopularitySignal.fit_judgments(judgments)
    assert popularity.score(Context(query="anything"), ["p1", "p2", "p3"]).tolist() == [2.0, 1.0, 0.0]


def _bm25_lucene(tf: int, doc_len: int, avg_len: float, df: int, n_docs: int, k1=1.5, b=0.75) -> float:
    # Lucene's variant (bm25s method="lucene"): no (k1 + 1) factor in the numerator, idf never negative
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * doc_len / avg_len))


def test_bm25_matches_the_lucene_formula_with_stemming_and_stop_words(tmp_path: Path) -> None:
    products = pd.DataFrame(
        {
            "product_id": ["p1", "p2", "p3"],
            "title": ["Red Drill", "the blue saw", "red red hammers"],
        }
    ).astype("string")
    bm25 = BM25Signal.fit(products)
    # after stop words ("the") and stemming: [red, drill], [blue, saw], [red, red, hammer]; avg length 7/3
    avg = 7 / 3
    scores = bm25.score(Context(query="red hammer"), ["p1", "p2", "p3", "unknown"])
    expected = [
        _bm25_lucene(1, 2, avg, df=2, n_docs=3),
        0.0,
        _bm25_lucene(2, 3, avg, df=2, n_docs=3) + _bm25_lucene(1, 3, avg, df=1, n_docs=3),
        0.0,
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert [pid for pid, _ in bm25.retrieve(Context(query="drills"), 10)] == ["p1"]
    assert bm25.retrieve(Context(query="nothing matches"), 10) == []
    assert bm25.score(Context(user_id="u1"), ["p1"]).tolist() == [0.0]
    _roundtrip(bm25, tmp_path, Context(query="red hammer"), ["p3", "p1", "x"])


def test_bm25_indexes_description_brand_and_category_when_present() -> None:
    products = pd.DataFrame(
        {"product_id": ["p1", "p2"], "title": ["Hammer", "Saw"], "brand": ["Stanley", None]}
    ).astype("string")
    bm25 = BM25Signal.fit(products)
    assert bm25.score(Context(query="stanley"), ["p1", "p2"])[0] > 0


def test_item_knn_sums_cosine_similarities_to_the_history(tmp_path: Path) -> None:
    # item columns: a={u1,u2}, b={u1,u2}, c={u2,u3}, d={u3}
    knn = ItemKNNSignal.fit(_events({"u1": ["a", "b"], "u2": ["a", "b", "c"], "u3": ["c", "d"]}))
    scores = knn.score(Context(user_id="new", history=("a",)), ["b", "c", "d", "a", "zz"])
    # cos(a,b) = 2/(sqrt2 sqrt2) = 1, cos(a,c) = 1/2, cos(a,d) = 0; an item is not its own neighbour
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.0, 0.0, 0.0], rtol=1e-6)
    assert knn.score(Context(user_id="cold"), ["a", "b"]).tolist() == [0.0, 0.0]
    assert [pid for pid, _ in knn.retrieve(Context(history=("a",)), 10)] == ["b", "c"]


def test_item_knn_recency_decay_weights_recent_history_more(tmp_path: Path) -> None:
    knn = ItemKNNSignal.fit(
        _events({"u1": ["a", "b"], "u2": ["a", "b", "c"], "u3": ["c", "d"]}), recency_decay=0.5
    )
    # history a (older, weight 0.5) then c (latest, weight 1): b = 0.5*1 + 1*0.5, d = 1*cos(c,d) = 1/sqrt2
    scores = knn.score(Context(history=("a", "c")), ["b", "d"])
    np.testing.assert_allclose(scores, [1.0, 1 / math.sqrt(2)], rtol=1e-6)
    _roundtrip(knn, tmp_path, Context(history=("a", "c")), ["b", "d", "q"])


def test_ease_weights_are_the_closed_form_ridge_solution(tmp_path: Path) -> None:
    # two items in the model: G = [[2, 1], [1, 2]]; with two items B[a, b] = G_ab / (G_aa + l2) = 1/3
    events = _events({"u1": ["a", "b"], "u2": ["a"], "u3": ["b", "rare"]})
    ease = EASESignal.fit(events, l2=1.0, min_item_count=2)
    scores = ease.score(Context(history=("a",)), ["b", "a", "rare", "unknown"])
    # "rare" (one event) is outside the model: lowest in-model score (0, for a itself) minus 1
    np.testing.assert_allclose(scores, [1 / 3, 0.0, -1.0, -1.0], rtol=1e-6)
    assert ease.retrieve(Context(history=("a",)), 5) == [("b", pytest.approx(1 / 3))]
    assert ease.retrieve(Context(), 5) == []
    with pytest.raises(DataError, match="min_item_count"):
        EASESignal.fit(events, min_item_count=10)
    _roundtrip(ease, tmp_path, Context(history=("b",)), ["a", "b", "rare"])


def test_fallback_retriever_fills_from_popularity_without_duplicates() -> None:
    events = _events({"u1": ["a", "b"], "u2": ["a", "b", "c"], "u3": ["c", "d"], "u4": ["e"], "u5": ["e"]})
    retriever = FallbackRetriever(ItemKNNSignal.fit(events), PopularitySignal.fit(events))
    hits = [pid for pid, _ in retriever.retrieve(Context(history=("a",)), 4)]
    # knn gives b, c (score > 0); popularity fills with the most popular of the rest (c: 2 and e: 2 taken
    # by id order after b and c are removed), never the history item a
    assert hits == ["b", "c", "e", "d"]
    assert [pid for pid, _ in retriever.retrieve(Context(), 2)] == ["a", "b"]


def test_load_signal_rejects_a_directory_without_a_saved_signal(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not hold a saved signal"):
        load_signal(tmp_path)
