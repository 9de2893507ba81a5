"""Train / validation / test splits that never leak, and the ranking examples built from them.

Search data is split by query: every judged row of a query lies in one split, so a model never sees a test
query's judgments. Recommendation data is split leave-last-out per user, by time: a user's last event is the
test target, the one before the validation target, and everything earlier is training data; a held-out
event's history is only what the user did strictly before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError, DataError
from fusionrank.signals.base import Retriever

SPLITS = ("train", "valid", "test")
# A user needs a training event besides the two held-out ones; shorter histories stay whole in training.
MIN_EVENTS_TO_HOLD_OUT = 3


def split_search(
    judgments: pd.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Split judged (query, product) rows by query into "train", "valid" and "test".

    The queries are sorted before a seeded shuffle, so the split depends only on the set of queries and
    `seed`, not on row order. Each split keeps the input's row order and a fresh index.
    """
    if valid_frac < 0 or test_frac < 0 or valid_frac + test_frac >= 1:
        raise ConfigError(
            f"split fractions must be >= 0 and leave some training data: valid_frac={valid_frac}, "
            f"test_frac={test_frac}"
        )
    _require(judgments, ("query", "product_id", "relevance"), "judgments")
    queries = np.sort(judgments["query"].unique().astype(str))
    order = np.random.default_rng(seed).permutation(len(queries))
    n_test = round(test_frac * len(queries))
    n_valid = round(valid_frac * len(queries))
    assigned = pd.Series("train", index=queries[order])
    assigned.iloc[:n_test] = "test"
    assigned.iloc[n_test : n_test + n_valid] = "valid"
    which = judgments["query"].astype(str).map(assigned)
    return {name: judgments[which == name].reset_index(drop=True) for name in SPLITS}


def split_recommendation(interactions: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Leave-last-out per user: "test" = each user's last event, "valid" = the one before, "train" = the rest.

    Events are ordered by `event_timestamp`, equal times by their row order. A user with fewer than three
    events keeps them all in "train". Each split is sorted by user, then time.
    """
    _require(interactions, ("user_id", "product_id", "event_timestamp"), "interactions")
    ordered = interactions.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    users = ordered.groupby("user_id", sort=False)
    from_end = users.cumcount(ascending=False).to_numpy()
    long_enough = (users["product_id"].transform("size") >= MIN_EVENTS_TO_HOLD_OUT).to_numpy()
    test = long_enough & (from_end == 0)
    valid = long_enough & (from_end == 1)
    return {
        "train": ordered[~(test | valid)].reset_index(drop=True),
        "valid": ordered[valid].reset_index(drop=True),
        "test": ordered[test].reset_index(drop=True),
    }


def search_examples(
    judgments_split: pd.DataFrame,
    candidates: Literal["judged", "retrieved"] = "judged",
    retriever: Retriever | None = None,
    k: int = 100,
    gain_offset: float = 0.0,
) -> list[RankingExample]:
    """One `RankingExample` per query of a search split, queries in sorted order.

    Gains are `relevance - gain_offset`, floored at 0, for every judged product of the query (also those a
    retriever missed, so that recall counts them). Pass `gain_offset=1.0` for Home Depot, whose scale runs
    from 1 (irrelevant) to 3 (`protocols.HOMEDEPOT_GAIN_OFFSET`). Candidates are the query's judged
    products ("judged") or the retriever's top `k` over the whole catalog ("retrieved").
    """
    _require(judgments_split, ("query", "product_id", "relevance"), "judgments")
    if candidates == "retrieved" and retriever is None:
        raise ConfigError(
            "search_examples(candidates='retrieved') needs a retriever (for example BM25Signal)"
        )
    if candidates not in ("judged", "retrieved"):
        raise ConfigError(f"candidates must be 'judged' or 'retrieved', not {candidates!r}")
    gains = (judgments_split["relevance"].to_numpy(dtype=np.float64) - gain_offset).clip(min=0.0)
    frame = pd.DataFrame(
        {
            "query": judgments_split["query"].astype(str),
            "product_id": judgments_split["product_id"].astype(str),
        }
    ).assign(gain=gains)
    examples = []
    for query, rows in frame.groupby("query", sort=True):
        context = Context(query=str(query))
        judged = dict(zip(rows["product_id"], rows["gain"].astype(float), strict=True))
        if candidates == "judged":
            listed = list(dict.fromkeys(rows["product_id"]))
        else:
            assert retriever is not None
            listed = [pid for pid, _ in retriever.retrieve(context, k)]
        examples.append(RankingExample(context=context, candidates=listed, gains=judged))
    return examples


def user_histories(split_frames: Mapping[str, pd.DataFrame], which: Literal["valid", "test"]) -> pd.Series:
    """Each held-out user's product ids strictly before their `which` event, oldest first (index: user_id)."""
    before = ["train"] if which == "valid" else ["train", "valid"]
    known = pd.concat([split_frames[name] for name in before], ignore_index=True)
    known = known.sort_values(["user_id", "event_timestamp"], kind="stable")
    return known.groupby("user_id", sort=False)["product_id"].agg(lambda s: tuple(s.astype(str)))


def recommendation_examples(
    split_frames: Mapping[str, pd.DataFrame],
    which: Literal["valid", "test"] = "test",
    candidates: Literal["retrieved"] | Mapping[str, Sequence[str]] = "retrieved",
    retriever: Retriever | None = None,
    k: int = 100,
) -> list[RankingExample]:
    """One `RankingExample` per user held out in split `which`, users in sorted order.

    The context's history is the user's products strictly before the held-out event (oldest first); the
    held-out product has gain 1. Candidates come from `retriever` (top `k`, "retrieved") or from a mapping
    user_id -> product ids (a published protocol's lists); a user missing from the mapping is skipped.
    """
    if which not in ("valid", "test"):
        raise ConfigError(f"which must be 'valid' or 'test', not {which!r}")
    if isinstance(candidates, str) and (candidates != "retrieved" or retriever is None):
        raise ConfigError(
            "recommendation_examples needs candidates='retrieved' with a retriever, or a mapping"
        )
    held_out = split_frames[which].sort_values("user_id", kind="stable")
    histories = user_histories(split_frames, which)
    examples = []
    for user, target in zip(held_out["user_id"].astype(str), held_out["product_id"].astype(str), strict=True):
        context = Context(user_id=user, history=histories.get(user, ()))
        if isinstance(candidates, str):
            assert retriever is not None
            listed = [pid for pid, _ in retriever.retrieve(context, k)]
        elif user in candidates:
            listed = list(candidates[user])
        else:
            continue
        examples.append(RankingExample(context=context, candidates=listed, gains={target: 1.0}))
    return examples


def _require(frame: pd.DataFrame, columns: Sequence[str], table: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"table '{table}' lacks column(s) {missing}; it has {list(frame.columns)}")
