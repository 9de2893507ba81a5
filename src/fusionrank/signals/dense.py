"""The dense signal: the bi-encoder's cosine between a request's context and each product's embedding.

Product embeddings are computed once (by the pipeline, with the model they belong to) and saved beside the
model; a request pays one short forward pass for its context text (the query, the user's recent titles, or
both, as `fusionrank.text.context_text` writes it for the cross-encoder) and a dot product per product. So
the same signal scores any candidates and retrieves over the whole catalog (`retrieve`, exact inner product).

Exact search over N products of dimension d costs N*d multiply-adds per request (Home Depot: 55k x 384,
21M) plus a partial sort; `benchmarks/bench_dense.py` measures it on this CPU. It grows linearly with the
catalog: an approximate index (HNSW: hnswlib, usearch or faiss; or the vector search of a Feast online store
that offers it, over the `product_embedding` view) becomes worth its recall loss and build time once the
exact scan's measured p99 no longer fits the retrieval budget (10 ms per request in issue #11).

A user's context vector can also be computed ahead of the request (`precompute`, by the pipeline, for each
user's history as the feature store holds it): a served recommendation then reads it instead of running the
encoder, which for a 48-token history was half of a request's CPU time. The vectors are keyed by a digest
of the context text, so a history that changed since the model was built (a new event in the store) simply
misses and is encoded as before: a precomputed vector never stands for a text it was not computed from.

A product without an embedding (new to the catalog since the model was built, or left out of a sampled run)
and a request without any context text (a cold-start user without a query) score NaN: the fusion treats
that as a missing value, so the other signals rank them, and `coverage` says how many products have one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrank.context import Context
from fusionrank.errors import DataError
from fusionrank.signals.base import ProductIndex, read_meta, top_k, write_meta

# contexts whose retrieval shares one pass over the embeddings (the scores take 4 bytes x products each)
RETRIEVE_BATCH = 32

KIND = "dense"
MODEL_DIR = "model"
EMBEDDINGS_FILE = "embeddings.npy"
TITLES_FILE = "titles.parquet"
KNOWN_VECTORS_FILE = "context_vectors.npy"
KNOWN_KEYS_FILE = "context_keys.parquet"
# Context vectors kept per signal: a served request encodes its text once for retrieval and scoring both,
# and a repeated query or history is not encoded again.
VECTOR_CACHE_SIZE = 4096


def text_key(text: str) -> str:
    """The key of a context text among the precomputed vectors (a digest: the bundle keeps no texts)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class KnownVectors:
    """Context vectors computed ahead of requests, one row per distinct text, keyed by `text_key`."""

    rows: dict[str, int] = field(default_factory=dict)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, text: str) -> np.ndarray | None:
        row = self.rows.get(text_key(text)) if self.rows else None
        return None if row is None else self.vectors[row]


@dataclass
class DenseSignal:
    """Cosine of the bi-encoder embeddings of the context text and of each product's text."""

    index: ProductIndex
    embeddings: np.ndarray  # [products, dimension] float32, unit length, rows in `index` order
    encoder: object  # fusionrank.biencoder.BiEncoder
    titles: Mapping[str, str]  # every catalog product's title: history texts read them
    catalog_size: int
    int8: bool = False
    name: str = "dense"
    cache_size: int = VECTOR_CACHE_SIZE  # context vectors kept (see `_encode`); 0 keeps none
    known: KnownVectors = field(default_factory=KnownVectors)  # see `precompute`
    _vectors: OrderedDict[str, np.ndarray] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        encoder: object,
        products: pd.DataFrame,
        embed_ids: Sequence[str] | None = None,
        batch_size: int = 256,
        int8: bool = False,
        name: str = "dense",
    ) -> DenseSignal:
        """Embed the products of `embed_ids` (default: the whole catalog) with `encoder`.

        `int8` records how a CPU server should load the context encoder (int8 dynamic quantization); the
        product embeddings are computed with the encoder as given.
        """
        from fusionrank.text import product_text

        ids = products["product_id"].astype(str)
        titles = dict(zip(ids, products["title"].astype(str), strict=True))
        chosen = list(ids) if embed_ids is None else [str(p) for p in embed_ids if str(p) in titles]
        chosen = list(dict.fromkeys(chosen))
        vectors = encoder.encode([product_text(titles[p]) for p in chosen], batch_size=batch_size)
        return cls(ProductIndex(chosen), vectors.astype(np.float32), encoder, titles, len(titles), int8, name)

    @property
    def coverage(self) -> float:
        """The fraction of the catalog that has an embedding."""
        return len(self.index) / self.catalog_size if self.catalog_size else 0.0

    def context_texts(self, contexts: Sequence[Context]) -> list[str]:
        from fusionrank.text import context_text

        return [context_text(c, self.titles) for c in contexts]

    def context_vectors(self, contexts: Sequence[Context]) -> np.ndarray:
        """One embedding per context; an all-NaN row for a context without any text."""
        texts = self.context_texts(contexts)
        out = np.full((len(texts), self.embeddings.shape[1]), np.nan, dtype=np.float32)
        codes, unique = pd.factorize(pd.Series(texts, dtype=object))
        present = np.array([bool(t.strip()) for t in unique], dtype=bool)
        if present.any():
            vectors = np.full((len(unique), self.embeddings.shape[1]), np.nan, dtype=np.float32)
            texts_present = [t for t, p in zip(unique, present, strict=True) if p]
            vectors[present] = self._encode(texts_present)
            out = vectors[codes]
        return out

    def precompute(self, contexts: Sequence[Context], batch_size: int = 256) -> int:
        """Compute and keep the vector of each context's text (the distinct non-empty ones), in place of any
        kept before, with the encoder as it is now: the pipeline's full-precision one, whatever a CPU server
        later loads. Returns how many texts are kept. A request whose context text is one of them reads its
        vector instead of encoding."""
        texts = [t for t in dict.fromkeys(self.context_texts(contexts)) if t.strip()]
        vectors = self.encoder.encode(texts, batch_size=batch_size) if texts else None
        if vectors is None:
            self.known = KnownVectors()
        else:
            keys = {text_key(t): i for i, t in enumerate(texts)}
            self.known = KnownVectors(keys, np.ascontiguousarray(vectors, dtype=np.float32))
        return len(self.known)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """The vector of each (distinct, non-empty) text: the precomputed one where there is one, else the
        encoder's, from the cache where it has one."""
        found: dict[str, np.ndarray] = {}
        for text in texts:
            vector = self.known.get(text)
            if vector is not None:
                found[text] = vector
        with self._lock:
            for text in texts:
                vector = None if text in found else self._vectors.get(text)
                if vector is not None:
                    self._vectors.move_to_end(text)
                    found[text] = vector
        missing = [t for t in texts if t not in found]
        if missing:
            if getattr(self.encoder, "quantized", False):
                # int8 dynamic quantization scales activations per batch: one text per pass keeps a
                # request's score independent of the requests batched with it (tokenized together, each
                # pass at the text's own length, so each vector is the one a text alone gets)
                new = self.encoder.encode(missing, batch_size=1)
            else:
                new = self.encoder.encode(missing)
            with self._lock:
                for text, vector in zip(missing, new, strict=True):
                    found[text] = self._vectors[text] = vector
                while len(self._vectors) > self.cache_size:
                    self._vectors.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def score(self, context: Context, candidates: Sequence[str]) -> np.ndarray:
        return self.score_batch([context], [candidates])[0]

    def score_batch(
        self, contexts: Sequence[Context], candidate_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """Cosine per candidate; NaN for a product without an embedding or a context without text."""
        if not contexts:
            return []
        vectors = self.context_vectors(contexts)
        out = []
        for vector, candidates in zip(vectors, candidate_lists, strict=True):
            rows = self.index.lookup(list(candidates))
            scores = np.full(len(rows), np.nan, dtype=np.float32)
            known = rows >= 0
            if known.any() and not np.isnan(vector).any():
                scores[known] = self.embeddings[rows[known]] @ vector
            out.append(scores)
        return out

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        """The `k` embedded products nearest the context (exact inner product), best first; a user's own
        history is left out. None for a context without text."""
        return self.retrieve_batch([context], k)[0]

    def retrieve_batch(self, contexts: Sequence[Context], k: int) -> list[list[tuple[str, float]]]:
        """`retrieve` for each context, with one pass over the product embeddings for all of them.

        The exact search reads every embedding (the catalog's matrix, 84 MB for Home Depot) for each query:
        a matrix-vector product bound by memory bandwidth. One matrix product for a batch of contexts
        reads it once: on this 2-core CPU, 5 contexts took 13.7 ms together against 6.4 ms each.
        """
        found: list[list[tuple[str, float]]] = [[] for _ in contexts]
        if k <= 0 or not contexts:
            return found
        vectors = self.context_vectors(contexts)
        present = np.flatnonzero(~np.isnan(vectors).any(axis=1))
        for start in range(0, len(present), RETRIEVE_BATCH):
            rows = present[start : start + RETRIEVE_BATCH]
            scores = catalog_scores(self.embeddings, vectors[rows])
            for column, row in enumerate(rows):
                found[row] = top_k(scores[:, column], k, self.index, exclude=contexts[row].history)
        return found

    def save(self, directory: str | Path) -> Path:
        directory = write_meta(
            directory,
            KIND,
            name=self.name,
            product_ids=self.index.ids,
            dimension=int(self.embeddings.shape[1]),
            catalog_size=self.catalog_size,
            int8=self.int8,
            known_contexts=len(self.known),
        )
        np.save(directory / EMBEDDINGS_FILE, self.embeddings.astype(np.float32))
        for stale in (KNOWN_VECTORS_FILE, KNOWN_KEYS_FILE):
            (directory / stale).unlink(missing_ok=True)
        if len(self.known):
            np.save(directory / KNOWN_VECTORS_FILE, self.known.vectors)
            keys = sorted(self.known.rows, key=self.known.rows.__getitem__)
            pd.DataFrame({"key": keys}).to_parquet(directory / KNOWN_KEYS_FILE, index=False)
        pd.DataFrame({"product_id": list(self.titles), "title": list(self.titles.values())}).to_parquet(
            directory / TITLES_FILE, index=False
        )
        self.encoder.save(directory / MODEL_DIR)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None, int8: bool | None = None) -> DenseSignal:
        """Load a saved signal; `int8=None` follows what the signal recorded (int8 applies on a CPU only)."""
        from fusionrank.biencoder import BiEncoder, resolve_device

        directory = Path(directory)
        meta = read_meta(directory, KIND)
        embeddings = np.load(directory / EMBEDDINGS_FILE)
        if embeddings.shape != (len(meta["product_ids"]), meta["dimension"]):
            raise DataError(
                f"{directory / EMBEDDINGS_FILE}: shape {embeddings.shape}, expected "
                f"({len(meta['product_ids'])}, {meta['dimension']})"
            )
        titles_frame = pd.read_parquet(directory / TITLES_FILE)
        titles = dict(
            zip(titles_frame["product_id"].astype(str), titles_frame["title"].astype(str), strict=True)
        )
        known = KnownVectors()
        if meta.get("known_contexts", 0):
            vectors = np.load(directory / KNOWN_VECTORS_FILE)
            keys = pd.read_parquet(directory / KNOWN_KEYS_FILE)["key"].astype(str).tolist()
            if vectors.shape != (len(keys), meta["dimension"]) or len(keys) != meta["known_contexts"]:
                raise DataError(
                    f"{directory / KNOWN_VECTORS_FILE}: shape {vectors.shape} for {len(keys)} keys, expected "
                    f"({meta['known_contexts']}, {meta['dimension']})"
                )
            known = KnownVectors({k: i for i, k in enumerate(keys)}, vectors.astype(np.float32))
        wanted = meta.get("int8", False) if int8 is None else int8
        on_cpu = resolve_device(device).type == "cpu"
        encoder = BiEncoder.load(directory / MODEL_DIR, device=device, quantize=bool(wanted and on_cpu))
        return cls(
            ProductIndex(meta["product_ids"]),
            embeddings.astype(np.float32),
            encoder,
            titles,
            int(meta["catalog_size"]),
            bool(meta.get("int8", False)),
            meta["name"],
            known=known,
        )


def catalog_scores(embeddings: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """[products, len(vectors)]: the inner product of every product with each vector.

    Always a matrix-matrix product of at least two columns: BLAS's matrix-vector kernel rounds differently
    from its matrix-matrix one (in the last bits of a float32), while each column of a matrix product
    comes out the same whatever the other columns are (OpenBLAS; a test checks it). So a context vector
    retrieves the same products alone, in a server's batch and in the pipeline's evaluation (int8 context
    vectors are themselves encoded one text per pass; fp32 ones encoded together differ by rounding only).
    """
    if len(vectors) == 1:
        return (embeddings @ np.vstack([vectors, vectors]).T)[:, :1]
    return embeddings @ vectors.T


def dense_extras(dense: DenseSignal, context: Context, have: Collection[str], hybrid_k: int) -> list[str]:
    """What hybrid retrieval adds to a first stage's candidates `have`: the dense top `hybrid_k` for
    `context` that it lacks (the pipeline's evaluation candidates and the server's are built this way)."""
    return dense_extras_batch(dense, [context], [have], hybrid_k)[0]


def dense_extras_batch(
    dense: DenseSignal, contexts: Sequence[Context], haves: Sequence[Collection[str]], hybrid_k: int
) -> list[list[str]]:
    """`dense_extras` of each context, with one pass over the embeddings (`DenseSignal.retrieve_batch`)."""
    if hybrid_k <= 0:
        return [[] for _ in contexts]
    batch = getattr(dense, "retrieve_batch", None)
    hits = batch(contexts, hybrid_k) if batch else [dense.retrieve(c, hybrid_k) for c in contexts]
    return [[pid for pid, _ in found if pid not in have] for found, have in zip(hits, haves, strict=True)]


def fused_retrieve(
    retrievers: Sequence[object], context: Context, k: int, depth: int | None = None
) -> list[str]:
    """Hybrid retrieval: the union of several retrievers' top `depth` (default `k`), ordered by reciprocal
    rank fusion (score 1 / (60 + rank) summed over the lists, Cormack et al. 2009), cut to `k`.

    Each retriever's scores live on their own scale (BM25 against a cosine), so only ranks are combined.
    Ties keep the order in which the products were first met, retriever by retriever.
    """
    depth = depth or k
    fused: dict[str, float] = {}
    for retriever in retrievers:
        for rank, (pid, _) in enumerate(retriever.retrieve(context, depth), start=1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (60 + rank)
    return [pid for pid, _ in sorted(fused.items(), key=lambda item: -item[1])][:k]
