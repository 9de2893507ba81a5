"""What every traditional signal offers, and the few helpers they share (ids, top-k, save/load files).

A signal is fitted on training data only, scores any candidates for a `Context` (an unknown product gets
the signal's documented default, never an error) and saves itself as JSON plus numpy/scipy `.npz` files:
no pickle, so a saved signal can be read without running code from it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fusionrank.context import Context
from fusionrank.errors import DataError

META_FILE = "signal.json"


@runtime_checkable
class Signal(Protocol):
    """A fitted scorer of (context, candidates)."""

    name: str

    def score(self, context: Context, candidates: Sequence[str]) -> np.ndarray:
        """One float32 score per candidate, higher is better."""
        ...

    def score_batch(
        self, contexts: Sequence[Context], candidate_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """`score` for many requests at once."""
        ...

    def save(self, directory: str | Path) -> Path:
        """Write the fitted signal under `directory`; return it."""
        ...


@runtime_checkable
class Retriever(Protocol):
    """A candidate generator: the top `k` products of the catalog for a context, best first."""

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        """Up to `k` (product_id, score) pairs, best first."""
        ...


@dataclass
class FallbackRetriever:
    """The primary retriever's hits, then the fallback's to fill up to `k` (for example item-kNN, then
    popularity for a cold-start user or a short list). Each hit keeps its own retriever's score, so only
    the order of the list is meaningful across the two.
    """

    primary: Retriever
    fallback: Retriever

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        hits = self.primary.retrieve(context, k)
        if len(hits) >= k:
            return hits[:k]
        seen = {pid for pid, _ in hits}
        extra = [hit for hit in self.fallback.retrieve(context, k + len(seen)) if hit[0] not in seen]
        return hits + extra[: k - len(hits)]


class ProductIndex:
    """A fixed list of product ids and each id's row, so signals can keep their state in arrays."""

    def __init__(self, product_ids: Sequence[str]) -> None:
        self.ids = [str(p) for p in product_ids]
        self.rows = {pid: i for i, pid in enumerate(self.ids)}
        if len(self.rows) != len(self.ids):
            raise DataError("product ids given to a signal must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, product_ids: Sequence[str]) -> np.ndarray:
        """The row of each id, -1 for an id outside the index."""
        # map over the dict's own get: a third faster than a generator expression, and called per signal
        return np.fromiter(
            map(self.rows.get, product_ids, itertools.repeat(-1)), dtype=np.int64, count=len(product_ids)
        )


def gather(values: np.ndarray, rows: np.ndarray, default: float) -> np.ndarray:
    """`values[rows]` as float32, with `default` where a row is -1 (an unknown product)."""
    out = np.full(len(rows), default, dtype=np.float32)
    known = rows >= 0
    out[known] = values[rows[known]]
    return out


def top_k(
    scores: np.ndarray, k: int, index: ProductIndex, exclude: Sequence[str] = ()
) -> list[tuple[str, float]]:
    """The `k` best rows of a catalog-wide score vector as (product_id, score), best first.

    Rows in `exclude` (for example a user's history) are left out. Equal scores are ordered by row, so a
    result never depends on the partial sort's internals.
    """
    scores = np.asarray(scores, dtype=np.float32)
    excluded = index.lookup(list(exclude))
    excluded = excluded[excluded >= 0]
    if len(excluded):
        scores = scores.copy()
        scores[excluded] = -np.inf
    k = min(k, len(scores) - len(np.unique(excluded)))
    if k <= 0:
        return []
    picked = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # lexsort's last key is primary: best score first, then lowest row among equal scores
    picked = picked[np.lexsort((picked, -scores[picked]))]
    return [(index.ids[i], float(scores[i])) for i in picked]


def write_meta(directory: str | Path, kind: str, **fields: Any) -> Path:
    """Create `directory` and write the signal's JSON description (its `kind` names the class to load)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps({"kind": kind, **fields}, indent=2, sort_keys=True))
    return directory


def read_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The JSON description a `save` left in `directory`; DataError when absent or of another kind."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; {directory} does not hold a saved signal")
    meta = json.loads(path.read_text())
    if kind is not None and meta.get("kind") != kind:
        raise DataError(f"{path}: holds a saved {meta.get('kind')!r} signal, expected {kind!r}")
    return meta


def load_signal(directory: str | Path) -> Signal:
    """Load whichever signal a `save` left in `directory`."""
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.cf import EASESignal, ItemKNNSignal
    from fusionrank.signals.dense import DenseSignal
    from fusionrank.signals.popularity import PopularitySignal
    from fusionrank.signals.sequential import SASRecSignal

    classes: dict[str, Any] = {
        "bm25": BM25Signal,
        "popularity": PopularitySignal,
        "item_knn": ItemKNNSignal,
        "ease": EASESignal,
        "dense": DenseSignal,
        "sasrec": SASRecSignal,
    }
    kind = read_meta(directory)["kind"]
    if kind not in classes:
        raise DataError(f"{directory}: unknown signal kind {kind!r}; known: {sorted(classes)}")
    return classes[kind].load(directory)
