"""Item-item collaborative filtering for users: cosine item-kNN and EASE, both a few lines of scipy/numpy.

Both are fitted on the training interactions only and score a candidate from the user's history (the
`Context.history`, oldest first), so a user unseen in training is served from their request-time history.

EASE (Steck, WWW 2019) needs a dense item x item matrix: on Amazon Games' 16,837 training items that is
16,837^2 float32 = 1.1 GB to keep (2.3 GB in float64 to invert), too much for a served artifact. It is
therefore fitted on the items with at least `min_item_count` training events (>= 10: 8,259 items,
273 MB); `implicit` (ALS) is not installed, and item-kNN already covers the whole catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from fusionrank.context import Context
from fusionrank.errors import ConfigError, DataError
from fusionrank.signals.base import ProductIndex, gather, read_meta, top_k, write_meta


def interaction_matrix(interactions: pd.DataFrame, index: ProductIndex) -> sp.csr_matrix:
    """Binary users x products matrix (CSR, float32) of `interactions`, columns in `index` order.

    Products outside `index` are dropped; repeated (user, product) events count once.
    """
    users = interactions["user_id"].astype(str).astype("category").cat.codes.to_numpy()
    cols = index.lookup(list(interactions["product_id"].astype(str)))
    keep = cols >= 0
    shape = (int(users.max()) + 1 if len(users) else 0, len(index))
    matrix = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (users[keep], cols[keep])), shape=shape)
    matrix.data[:] = 1.0
    return matrix


def history_weights(
    history: Sequence[str], index: ProductIndex, recency_decay: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a history's known products and their weights: `recency_decay ** age`, age 0 = latest.

    A product bought twice keeps the weight of its latest purchase.
    """
    rows = index.lookup(list(history))
    ages = np.arange(len(rows) - 1, -1, -1, dtype=np.float64)
    known = rows >= 0
    rows, weights = rows[known], np.power(recency_decay, ages[known])
    # reversed so that np.unique's first occurrence is the latest purchase
    unique_rows, first = np.unique(rows[::-1], return_index=True)
    return unique_rows, weights[::-1][first].astype(np.float32)


@dataclass
class ItemKNNSignal:
    """Cosine item-kNN: a candidate's score is the sum, over the user's history, of its cosine similarity
    to each history item (each weighted by `recency_decay ** age`; 1.0 weighs all alike).

    Similarity is the cosine between items' columns of the binary user x item matrix; 0 for an unknown
    product or an empty history.
    """

    index: ProductIndex
    similarity: sp.csr_matrix
    recency_decay: float = 1.0
    name: str = "item_knn"

    @classmethod
    def fit(
        cls, interactions: pd.DataFrame, recency_decay: float = 1.0, name: str = "item_knn"
    ) -> ItemKNNSignal:
        """Fit on the training interactions."""
        if not 0 < recency_decay <= 1:
            raise ConfigError(f"recency_decay must be in (0, 1], not {recency_decay}")
        index = ProductIndex(sorted(interactions["product_id"].astype(str).unique()))
        matrix = interaction_matrix(interactions, index)
        cooccurrence = (matrix.T @ matrix).tocsr()
        inverse_norm = sp.diags(1.0 / np.sqrt(np.maximum(cooccurrence.diagonal(), 1.0)).astype(np.float32))
        similarity = (inverse_norm @ cooccurrence @ inverse_norm).tocsr()
        similarity.setdiag(0.0)
        similarity.eliminate_zeros()
        return cls(
            index=index, similarity=similarity.astype(np.float32), recency_decay=recency_decay, name=name
        )

    def catalog_scores(self, context: Context) -> np.ndarray:
        """The score of every product of the index for this user."""
        rows, weights = history_weights(context.history, self.index, self.recency_decay)
        if len(rows) == 0:
            return np.zeros(len(self.index), dtype=np.float32)
        return np.asarray(self.similarity[rows].T @ weights, dtype=np.float32).ravel()

    def score(self, context: Context, candidates: Sequence[str]) -> np.ndarray:
        return gather(self.catalog_scores(context), self.index.lookup(list(candidates)), default=0.0)

    def score_batch(
        self, contexts: Sequence[Context], candidate_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        return [self.score(c, cands) for c, cands in zip(contexts, candidate_lists, strict=True)]

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        """Up to `k` products similar to the history (score > 0), excluding the history itself."""
        hits = top_k(self.catalog_scores(context), k, self.index, exclude=context.history)
        return [(pid, s) for pid, s in hits if s > 0]

    def save(self, directory: str | Path) -> Path:
        directory = write_meta(
            directory,
            "item_knn",
            name=self.name,
            recency_decay=self.recency_decay,
            product_ids=self.index.ids,
        )
        sp.save_npz(directory / "similarity.npz", self.similarity)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ItemKNNSignal:
        meta = read_meta(directory, "item_knn")
        similarity = sp.load_npz(Path(directory) / "similarity.npz").tocsr()
        return cls(
            index=ProductIndex(meta["product_ids"]),
            similarity=similarity,
            recency_decay=meta["recency_decay"],
            name=meta["name"],
        )


@dataclass
class EASESignal:
    """EASE: a candidate's score is the sum of the learned item-item weights B[h, candidate] over the
    user's history h (closed form, L2 penalty `l2`, zero diagonal).

    Only items with at least `min_item_count` training events are in the model (see the module note).
    A product outside it ranks below every product in it: it gets the request's lowest in-model score
    minus 1 (EASE weights can be negative, so 0 would rank it above disliked items).
    """

    index: ProductIndex
    weights: np.ndarray
    l2: float
    min_item_count: int
    name: str = "ease"

    @classmethod
    def fit(
        cls, interactions: pd.DataFrame, l2: float = 500.0, min_item_count: int = 10, name: str = "ease"
    ) -> EASESignal:
        """Fit on the training interactions."""
        if l2 <= 0:
            raise ConfigError(f"EASE's l2 penalty must be positive, not {l2}")
        counts = interactions["product_id"].astype(str).value_counts()
        kept = sorted(counts.index[counts >= min_item_count])
        if not kept:
            raise DataError(f"no product has >= {min_item_count} training events; lower min_item_count")
        index = ProductIndex(kept)
        matrix = interaction_matrix(interactions, index)
        gram = (matrix.T @ matrix).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += l2
        precision = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
        weights = precision / -np.diag(precision)
        weights[np.diag_indices_from(weights)] = 0.0
        return cls(
            index=index, weights=weights.astype(np.float32), l2=l2, min_item_count=min_item_count, name=name
        )

    def _history_scores(self, context: Context) -> np.ndarray:
        rows = np.unique(self.index.lookup(list(context.history)))
        rows = rows[rows >= 0]
        return self.weights[rows].sum(axis=0, dtype=np.float32)

    def score(self, context: Context, candidates: Sequence[str]) -> np.ndarray:
        scores = self._history_scores(context)
        return gather(scores, self.index.lookup(list(candidates)), default=float(scores.min()) - 1.0)

    def score_batch(
        self, contexts: Sequence[Context], candidate_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        return [self.score(c, cands) for c, cands in zip(contexts, candidate_lists, strict=True)]

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        """The `k` in-model products with the highest score, excluding the history; none without one."""
        if not context.history:
            return []
        return top_k(self._history_scores(context), k, self.index, exclude=context.history)

    def save(self, directory: str | Path) -> Path:
        directory = write_meta(
            directory,
            "ease",
            name=self.name,
            l2=self.l2,
            min_item_count=self.min_item_count,
            product_ids=self.index.ids,
        )
        np.savez(directory / "weights.npz", weights=self.weights)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EASESignal:
        meta = read_meta(directory, "ease")
        with np.load(Path(directory) / "weights.npz", allow_pickle=False) as arrays:
            weights = arrays["weights"]
        return cls(
            index=ProductIndex(meta["product_ids"]),
            weights=weights,
            l2=meta["l2"],
            min_item_count=meta["min_item_count"],
            name=meta["name"],
        )
