"""BM25 (bm25s) over product text, for queries: a scorer of candidates and a first-stage retriever."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusionrank.context import Context
from fusionrank.errors import DataError
from fusionrank.signals.base import ProductIndex, gather, read_meta, top_k, write_meta

KIND = "bm25"
TEXT_COLUMNS = ("title", "description", "brand", "category")
STEMMER = "snowball-english"


def _stemmer() -> Callable[[str], str]:
    # nltk costs ~2 s to import; only fitting and loading a BM25 index pays it
    from nltk.stem.snowball import SnowballStemmer

    return SnowballStemmer("english").stem


def product_text(products: pd.DataFrame) -> pd.Series:
    """Each product's searchable text: title, then description, brand and category where present."""
    present = [c for c in TEXT_COLUMNS if c in products.columns]
    if "title" not in present:
        raise DataError(
            f"products table lacks the 'title' column BM25 indexes; it has {list(products.columns)}"
        )
    text = products[present].astype("string").fillna("")
    return text.agg(" ".join, axis=1).str.strip()


@dataclass
class BM25Signal:
    """BM25 score of a product's text for the context's query; 0 for an unknown product or no query.

    Text is lower-cased, split on word characters, stripped of English stop words and Snowball-stemmed,
    so "brackets" matches "bracket". `k1` and `b` are Lucene's BM25 parameters.
    """

    index: ProductIndex
    bm25: Any
    tokenizer: Any
    name: str = "bm25"

    @classmethod
    def fit(cls, products: pd.DataFrame, k1: float = 1.5, b: float = 0.75, name: str = "bm25") -> BM25Signal:
        """Index the text of every product in `products` (the catalog, which holds no judgments)."""
        import bm25s
        from bm25s.tokenization import Tokenizer

        tokenizer = Tokenizer(stopwords="en", stemmer=_stemmer())
        tokens = tokenizer.tokenize(list(product_text(products)), return_as="tuple", show_progress=False)
        bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        bm25.index(tokens, show_progress=False)
        return cls(
            index=ProductIndex(products["product_id"].astype(str)), bm25=bm25, tokenizer=tokenizer, name=name
        )

    def catalog_scores(self, query: str | None) -> np.ndarray:
        """The BM25 score of every indexed product for `query` (all zero without one)."""
        if not query:
            return np.zeros(len(self.index), dtype=np.float32)
        ids = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
        return np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32)

    def score(self, context: Context, candidates: Sequence[str]) -> np.ndarray:
        return gather(self.catalog_scores(context.query), self.index.lookup(list(candidates)), default=0.0)

    def score_batch(
        self, contexts: Sequence[Context], candidate_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        return [self.score(c, cands) for c, cands in zip(contexts, candidate_lists, strict=True)]

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        """Up to `k` products with the highest BM25 score for the query; none that match no query term."""
        hits = top_k(self.catalog_scores(context.query), k, self.index)
        return [(pid, s) for pid, s in hits if s > 0]

    def save(self, directory: str | Path) -> Path:
        directory = write_meta(directory, KIND, name=self.name, stemmer=STEMMER, product_ids=self.index.ids)
        self.bm25.save(directory / "index", show_progress=False)
        self.tokenizer.save_vocab(directory / "index")
        self.tokenizer.save_stopwords(directory / "index")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BM25Signal:
        import bm25s
        from bm25s.tokenization import Tokenizer

        meta = read_meta(directory, KIND)
        if meta["stemmer"] != STEMMER:
            raise DataError(
                f"{directory}: saved with stemmer {meta['stemmer']!r}; this version uses {STEMMER!r}"
            )
        saved = Path(directory) / "index"
        tokenizer = Tokenizer(stopwords="en", stemmer=_stemmer())
        tokenizer.load_vocab(saved)
        tokenizer.load_stopwords(saved)
        bm25 = bm25s.BM25.load(saved, show_progress=False)
        return cls(index=ProductIndex(meta["product_ids"]), bm25=bm25, tokenizer=tokenizer, name=meta["name"])
