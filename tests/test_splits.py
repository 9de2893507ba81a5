"""Splits: no query leaks between search splits, no user future leaks into recommendation training."""

from __future__ import annotations

import pandas as pd
import pytest

from fusionrank.context import Context
from fusionrank.errors import ConfigError
from fusionrank.splits import recommendation_examples, search_examples, split_recommendation, split_search


def _judgments(n_queries: int = 50) -> pd.DataFrame:
    rows = [(f"query {q}", f"p{q}-{j}", 1.0 + j) for q in range(n_queries) for j in range(3)]
    return pd.DataFrame(rows, columns=["query", "product_id", "relevance"])


def _events(sequences: dict[str, list[str]]) -> pd.DataFrame:
    rows = [
        (user, pid, pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=day))
        for user, items in sequences.items()
        for day, pid in enumerate(items)
    ]
    # shuffled on purpose: the split must order by time, not trust row order
    return pd.DataFrame(rows, columns=["user_id", "product_id", "event_timestamp"]).sample(
        frac=1, random_state=3
    )


def test_split_search_keeps_each_query_in_one_split() -> None:
    splits = split_search(_judgments(), valid_frac=0.2, test_frac=0.2, seed=1)
    queries = {name: set(frame["query"]) for name, frame in splits.items()}
    assert not queries["train"] & queries["test"]
    assert not queries["train"] & queries["valid"]
    assert not queries["valid"] & queries["test"]
    assert (len(queries["train"]), len(queries["valid"]), len(queries["test"])) == (30, 10, 10)
    assert sum(len(f) for f in splits.values()) == 150
    assert all(len(f) == 3 * len(queries[name]) for name, f in splits.items())


def test_split_search_is_deterministic_and_ignores_row_order() -> None:
    judgments = _judgments()
    first = split_search(judgments, seed=7)["test"]
    again = split_search(judgments.sample(frac=1, random_state=0), seed=7)["test"]
    other_seed = split_search(judgments, seed=8)["test"]
    assert set(first["query"]) == set(again["query"])
    assert set(first["query"]) != set(other_seed["query"])


def test_split_search_rejects_fractions_that_leave_no_training() -> None:
    with pytest.raises(ConfigError, match="leave some training data"):
        split_search(_judgments(), valid_frac=0.5, test_frac=0.5)


def test_split_recommendation_holds_out_the_last_two_events_by_time() -> None:
    splits = split_recommendation(
        _events({"u1": ["a", "b", "c", "d"], "u2": ["x", "y"], "u3": ["e", "f", "g"]})
    )
    assert splits["test"].set_index("user_id")["product_id"].to_dict() == {"u1": "d", "u3": "g"}
    assert splits["valid"].set_index("user_id")["product_id"].to_dict() == {"u1": "c", "u3": "f"}
    train = splits["train"].groupby("user_id")["product_id"].agg(list).to_dict()
    # u2 has fewer than three events: all of them stay in training
    assert train == {"u1": ["a", "b"], "u2": ["x", "y"], "u3": ["e"]}
    # no training event of a user is later than that user's held-out events
    for name in ("valid", "test"):
        held = splits[name].set_index("user_id")["event_timestamp"]
        latest_train = splits["train"].groupby("user_id")["event_timestamp"].max()
        assert (latest_train.reindex(held.index) < held).all()


def test_search_examples_offsets_gains_and_keeps_judged_products_missed_by_retrieval() -> None:
    judgments = pd.DataFrame(
        {"query": ["drill", "drill", "saw"], "product_id": ["p1", "p2", "p3"], "relevance": [3.0, 1.0, 2.5]}
    )

    class OnlyP2:
        def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
            return [("p2", 1.0), ("p9", 0.5)][:k]

    judged = search_examples(judgments, "judged", gain_offset=1.0)
    assert [e.qid for e in judged] == ["drill", "saw"]
    assert judged[0].candidates == ["p1", "p2"]
    assert judged[0].gains == {"p1": 2.0, "p2": 0.0}
    assert judged[1].gains == {"p3": 1.5}
    retrieved = search_examples(judgments, "retrieved", retriever=OnlyP2(), k=5, gain_offset=1.0)
    assert retrieved[0].candidates == ["p2", "p9"]
    assert retrieved[0].gains == {"p1": 2.0, "p2": 0.0}
    with pytest.raises(ConfigError, match="needs a retriever"):
        search_examples(judgments, "retrieved")


def test_recommendation_examples_history_is_strictly_before_the_held_out_event() -> None:
    splits = split_recommendation(_events({"u1": ["a", "b", "c", "d"], "u3": ["e", "f", "g"]}))
    lists = {"u1": ["d", "z"], "u3": ["g", "a"]}
    test = recommendation_examples(splits, "test", candidates=lists)
    assert [(e.context.user_id, e.context.history, e.gains) for e in test] == [
        ("u1", ("a", "b", "c"), {"d": 1.0}),
        ("u3", ("e", "f"), {"g": 1.0}),
    ]
    valid = recommendation_examples(splits, "valid", candidates={"u1": ["c"]})
    assert [(e.context.user_id, e.context.history, e.gains) for e in valid] == [
        ("u1", ("a", "b"), {"c": 1.0})
    ]
