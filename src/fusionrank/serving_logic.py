"""What the served ranker does with a request, without BentoML: validate, retrieve, look up, score.

`serving/service.py` is a thin BentoML shell over `RankingLogic.rank_batch`. A request becomes a `Context`
(the history comes from the request or the online store) and candidates (the request's, or retrieved:
BM25 for a query, item-kNN for a user's history, popularity to fill up and for cold start); the online
store adds the feature columns; the frame is built and scored by the bundle (`Ranker.frame`,
`Ranker.score` = `fusion.score_candidates`), the function evaluation uses.

When the online store cannot be read the ranker still answers from the signals it has, and says so
(`degraded` and its reasons). A cascade fusion runs BERT on its shortlist only, as it was evaluated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError, FusionrankError, ServiceUnavailable
from fusionrank.ranker import FEATURE_PREFIX, Ranker
from fusionrank.signals.dense import VECTOR_CACHE_SIZE

# One online lookup reads at most 500 products (`features.MAX_LOOKUP_PRODUCTS`): a request stays within it.
MAX_CANDIDATES = 500
MAX_K = 100
MAX_HISTORY = 200
DEFAULT_RETRIEVE_K = 100
CONTRIBUTION_PREFIX = "c_"
# Retrieval fills the candidate list from these signal kinds, in this order (see `retrieve_candidates`).
POPULARITY_NAME = "popularity"
UNAVAILABLE = "online feature store unavailable, answered without its features"

ProductId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RankRequest(BaseModel):
    """POST /rank: a query, a user, or both; optionally the candidates to rank (retrieved when absent)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: Annotated[str, StringConstraints(max_length=1000)] | None = Field(
        None, description="The search query; leave it out for a recommendation request."
    )
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None, description="The user; their history and features come from the online store."
    )
    history: list[ProductId] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="The user's product ids, oldest first, when the caller knows them (else the store's).",
    )
    candidates: list[ProductId] | None = Field(
        None,
        min_length=1,
        max_length=MAX_CANDIDATES,
        description="Product ids to rank; leave it out to let the ranker retrieve candidates.",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="How many ranked products to return.")

    @model_validator(mode="after")
    def _query_or_user(self) -> RankRequest:
        if self.query is None and self.user_id is None:
            raise ValueError("give a query, a user_id, or both")
        if self.query is not None and not self.query.strip():
            raise ValueError("query is empty: send a non-empty query, or leave it out and send a user_id")
        return self


class RankedProduct(BaseModel):
    """One ranked product: its fused score and each signal's part of it (the parts sum to the score)."""

    product_id: str
    rank: int
    score: float
    contributions: dict[str, float]


class ModelInfo(BaseModel):
    """Which model answered."""

    tag: str
    mode: str
    fusion: str
    feature_service: str = ""
    data_hash: str = ""
    git_revision: str = ""


class RankResponse(BaseModel):
    """The ranking, the model that made it, and what it could not use."""

    results: list[RankedProduct]
    model: ModelInfo
    degraded: bool = False
    degraded_reasons: list[str] = Field(default_factory=list)
    cold_start: bool = False
    retrieved: bool = False
    unknown_candidates: list[str] = Field(default_factory=list)
    duplicate_candidates: list[str] = Field(default_factory=list)
    notes: list[str] = Field(
        default_factory=list, description="What the ranker changed in the request, e.g. a truncated query."
    )


@dataclass(frozen=True)
class ServingSettings:
    """Deployment settings of the ranker, read when the service starts (never at import)."""

    # How many candidates retrieval takes; None: the bundle's serving config (as evaluated), else 100.
    retrieve_k: int | None = None
    feature_repo: Path | None = None
    feature_store_yaml: Path | None = None
    store_retry_seconds: float = 30.0
    adaptive_batching: bool = True
    # How many candidates per request the cross-encoder re-scores; None: the bundle's serving config.
    rerank_k: int | None = None
    # int8 CPU inference of the cross-encoder and the context encoder; None: the bundle's serving config.
    int8: bool | None = None
    # Context vectors the dense signal keeps (the least recently used leave first): a request's text is
    # encoded once for retrieval and scoring, and a repeated query or history is not encoded again. 0: none.
    context_cache: int = VECTOR_CACHE_SIZE
    # Seconds a product's online features are kept in the worker (`features.ProductCache`); 0: read every
    # request's products from the store. Product features change when they are materialized, hours apart.
    product_cache_seconds: float = 60.0
    # Threads of a LambdaMART fusion's predictions (LightGBM); None: the model's share of the CPUs
    # (`fusion_threads`).
    fusion_threads: int | None = None
    # The model loaded and run in a process of its own beside each worker (`fusionrank.model_process`).
    model_process: bool = True

    def __post_init__(self) -> None:
        if self.retrieve_k is not None and not 1 <= self.retrieve_k <= MAX_CANDIDATES:
            raise ConfigError(f"retrieve_k must be between 1 and {MAX_CANDIDATES}, got {self.retrieve_k}")
        if self.store_retry_seconds < 0:
            raise ConfigError(f"store_retry_seconds must not be negative, got {self.store_retry_seconds}")
        if self.rerank_k is not None and not 0 <= self.rerank_k <= MAX_CANDIDATES:
            raise ConfigError(f"rerank_k must be between 0 and {MAX_CANDIDATES}, got {self.rerank_k}")
        if self.context_cache < 0:
            raise ConfigError(f"context_cache must not be negative, got {self.context_cache}")
        if not self.product_cache_seconds >= 0:
            raise ConfigError(f"product_cache_seconds must not be negative, got {self.product_cache_seconds}")
        if self.fusion_threads is not None and self.fusion_threads < 1:
            raise ConfigError(f"fusion_threads must be at least 1, got {self.fusion_threads}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """Settings from FUSIONRANK_* variables (FEATURE_REPO, FEATURE_STORE_YAML, RETRIEVE_K, RERANK_K,
        INT8=on|off, STORE_RETRY_SECONDS, ADAPTIVE_BATCHING=on|off, CONTEXT_CACHE, PRODUCT_CACHE_SECONDS,
        FUSION_THREADS, MODEL_PROCESS=on|off); unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        try:
            if "FUSIONRANK_RETRIEVE_K" in env:
                values["retrieve_k"] = int(env["FUSIONRANK_RETRIEVE_K"])
            if env.get("FUSIONRANK_RERANK_K", "").strip():
                values["rerank_k"] = int(env["FUSIONRANK_RERANK_K"])
            if "FUSIONRANK_STORE_RETRY_SECONDS" in env:
                values["store_retry_seconds"] = float(env["FUSIONRANK_STORE_RETRY_SECONDS"])
            if env.get("FUSIONRANK_CONTEXT_CACHE", "").strip():
                values["context_cache"] = int(env["FUSIONRANK_CONTEXT_CACHE"])
            if env.get("FUSIONRANK_PRODUCT_CACHE_SECONDS", "").strip():
                values["product_cache_seconds"] = float(env["FUSIONRANK_PRODUCT_CACHE_SECONDS"])
            if env.get("FUSIONRANK_FUSION_THREADS", "").strip():
                values["fusion_threads"] = int(env["FUSIONRANK_FUSION_THREADS"])
        except ValueError as exc:
            raise ConfigError(f"a FUSIONRANK_* serving setting is not a number: {exc}") from exc
        for key, name in (
            ("FUSIONRANK_FEATURE_REPO", "feature_repo"),
            ("FUSIONRANK_FEATURE_STORE_YAML", "feature_store_yaml"),
        ):
            if env.get(key):
                values[name] = Path(env[key])
        for key, name in (
            ("FUSIONRANK_INT8", "int8"),
            ("FUSIONRANK_ADAPTIVE_BATCHING", "adaptive_batching"),
            ("FUSIONRANK_MODEL_PROCESS", "model_process"),
        ):
            switch = env.get(key, "").strip().lower()
            if switch:
                if switch not in ("on", "off", "true", "false", "1", "0"):
                    raise ConfigError(f"{key} must be on or off, got {switch!r}")
                values[name] = switch in ("on", "true", "1")
        return cls(**values)


Lookup = tuple[str | None, Sequence[str]]
# a user's features, and per product feature its values in the order of the product ids (a DataFrame with a
# product_id column is one)
LookupAnswer = tuple[dict[str, Any], Mapping[str, Any]]


class FeatureSource(Protocol):
    """The online lookup the ranker needs (`fusionrank.features.OnlineFeatures` is one)."""

    def lookup_batch(self, lookups: Sequence[Lookup]) -> list[LookupAnswer]:
        """For each (user id or None, product ids): the user's features and the products' feature columns,
        in one read of the store; ServiceUnavailable when unreadable."""
        ...


class ReconnectingStore:
    """An online store opened on first use; when opening fails, tried again at most every `retry_seconds`.

    So a ranker started while the store is down answers (degraded) at once, and recovers by itself.
    """

    def __init__(
        self,
        opener: Callable[[], FeatureSource],
        retry_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._opener = opener
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._store: FeatureSource | None = None
        self._error: str | None = None
        self._failed_at = -float("inf")

    def lookup_batch(self, lookups: Sequence[Lookup]) -> list[LookupAnswer]:
        return self._open().lookup_batch(lookups)

    def _open(self) -> FeatureSource:
        if self._store is not None:
            return self._store
        if self._error is not None and self._clock() - self._failed_at < self._retry_seconds:
            raise ServiceUnavailable(self._error)
        try:
            self._store = self._opener()
        except FusionrankError as exc:
            self._error, self._failed_at = str(exc), self._clock()
            raise ServiceUnavailable(self._error) from exc
        self._error = None
        return self._store


def open_online_store(ranker: Ranker, settings: ServingSettings) -> FeatureSource | None:
    """The bundle's online store, opened lazily; None when neither the bundle nor the settings name one.

    The bundle names the features step's folder (`manifest["feature_store"]`), whose `feature_store.json`
    says where the Feast repository is; `FUSIONRANK_FEATURE_REPO` / `_FEATURE_STORE_YAML` override it (a
    cluster's Redis store, for instance).
    """
    store_dir = ranker.manifest.get("feature_store")
    if settings.feature_repo is None and not store_dir:
        return None
    service = ranker.manifest.get("feature_service") or None
    cache_seconds = settings.product_cache_seconds

    def opener() -> FeatureSource:
        from fusionrank.features import DEFAULT_FEATURE_SERVICE, OnlineFeatures
        from fusionrank.steps import STORE_INFO, read_store_info

        yaml_path = settings.feature_store_yaml
        if settings.feature_repo is None and (Path(store_dir) / STORE_INFO).is_file():
            info = read_store_info(store_dir)
            return OnlineFeatures(
                info.repo_path, info.feature_service, yaml_path or info.yaml_path, cache_seconds
            )
        repo = settings.feature_repo or Path(store_dir) / "feature_repo"
        return OnlineFeatures(repo, service or DEFAULT_FEATURE_SERVICE, yaml_path, cache_seconds)

    return ReconnectingStore(opener, settings.store_retry_seconds)


@dataclass
class _Prepared:
    """A request turned into what the frame needs, and what the response reports."""

    request: RankRequest
    example: RankingExample
    features: dict[str, np.ndarray] | None
    reasons: list[str] = field(default_factory=list)
    cold_start: bool = False
    retrieved: bool = False
    unknown: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RankingLogic:
    """A loaded bundle plus its online store: ranks batches of requests."""

    def __init__(
        self,
        ranker: Ranker,
        model_tag: str,
        store: FeatureSource | None,
        settings: ServingSettings | None = None,
    ) -> None:
        self.ranker = ranker
        self.store = store
        self.settings = settings or ServingSettings()
        manifest = ranker.manifest
        self.model = ModelInfo(
            tag=model_tag,
            mode=str(manifest.get("mode", "")),
            fusion=ranker.selected,
            feature_service=str(manifest.get("feature_service", "")),
            data_hash=str(manifest.get("data_hash", "")),
            git_revision=str(manifest.get("git_revision", "")),
        )
        self.rerank_k = resolve_rerank_k(ranker, self.settings)
        threads = self.settings.fusion_threads or fusion_threads(model_process=self.settings.model_process)
        for fusion in ranker.fusions.values():
            fusion.use_threads(threads)
        for signal in ranker.signals.values():
            if hasattr(signal, "cache_size"):
                signal.cache_size = self.settings.context_cache
        configured = (manifest.get("serving") or {}).get("retrieve_k")
        self.retrieve_k = self.settings.retrieve_k or int(configured or DEFAULT_RETRIEVE_K)

    def warm_up(self) -> str | None:
        """Rank one request before the first caller's: the online store is opened (Feast takes seconds) and
        every model runs once, so that no caller waits for that. The error it met, if any (the ranker still
        serves, as it would without the warm-up)."""
        try:
            self.rank_batch([RankRequest(query="warm up", k=1)])
        except Exception as exc:  # a failure here must not keep the worker from serving
            return f"{type(exc).__name__}: {exc}"
        return None

    def rank_batch(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        """Rank every request; one frame and one scoring call per group of requests with distinct ids."""
        prepared = self._prepare(requests)
        ranked: list[list[RankedProduct]] = [[] for _ in prepared]
        for group in _distinct_qid_groups(prepared):
            members = [prepared[i] for i in group]
            by_qid = _top_products(self._score(members), max(p.request.k for p in members))
            for i in group:
                ranked[i] = by_qid.get(prepared[i].example.qid, [])[: prepared[i].request.k]
        return [self._response(p, r) for p, r in zip(prepared, ranked, strict=True)]

    def _prepare(self, requests: Sequence[RankRequest]) -> list[_Prepared]:
        """Context, candidates and feature rows of each request, with one store read for the batch when the
        requests give their candidates, two when some are retrieved (a user's history must be known first).

        When a read fails, the requests it was for are answered without the store's features, and the
        batch does not read the store again.
        """
        count = len(requests)
        given: list[list[str] | None] = [None] * count
        unknown: list[list[str]] = [[] for _ in requests]
        duplicates: list[list[str]] = [[] for _ in requests]
        for i, request in enumerate(requests):
            if request.candidates is not None:
                known = _known_candidates(request.candidates, self.ranker.titles)
                given[i], unknown[i], duplicates[i] = known
        reasons: list[list[str]] = [[] for _ in requests]
        users: list[dict[str, Any] | None] = [None] * count
        products: list[Mapping[str, Any] | None] = [None] * count
        store_error: str | None = None
        first: list[int] = []
        if self.store is None:
            for notes in reasons:
                notes.append("no online feature store configured: answered without store features")
        else:
            first = [i for i, r in enumerate(requests) if r.user_id is not None or given[i]]
            store_error = self._read_store(
                first, [(requests[i].user_id, given[i] or []) for i in first], users, products, reasons
            )
        contexts = []
        for i, request in enumerate(requests):
            history = _history(request, users[i] or {})
            if request.user_id is not None and not history and users[i] is None and request.history is None:
                reasons[i].append("the user's history could not be read: ranked as a new user")
            contexts.append(Context(query=request.query, user_id=request.user_id, history=history))

        candidates = list(given)
        retrieving = [i for i in range(count) if given[i] is None]
        retrieved = retrieve_candidates_batch(self.ranker, [contexts[i] for i in retrieving], self.retrieve_k)
        for i, found in zip(retrieving, retrieved, strict=True):
            candidates[i] = found
        second = [i for i in retrieving if candidates[i]]
        if self.store is not None and second:
            if store_error is not None:  # the first read failed: told already, or told now
                for i in set(second) - set(first):
                    reasons[i].append(f"{UNAVAILABLE}: {store_error}")
            else:
                # the user was read with the first read; an anonymous request gets the store's defaults
                lookups = [(None, candidates[i] or []) for i in second]
                defaults: list[dict[str, Any] | None] = [None] * count
                self._read_store(second, lookups, defaults, products, reasons)
                for i in second:
                    users[i] = users[i] if users[i] is not None else defaults[i]

        out = []
        for i, request in enumerate(requests):
            example = RankingExample(context=contexts[i], candidates=candidates[i] or [])
            features = None
            if products[i] is not None and example.candidates:
                user = users[i] or {}
                features = online_feature_columns(example.qid, user, example.candidates, products[i])
            out.append(
                _Prepared(
                    request=request,
                    example=example,
                    features=features,
                    reasons=reasons[i],
                    cold_start=request.user_id is not None and not contexts[i].history,
                    retrieved=request.candidates is None,
                    unknown=unknown[i],
                    notes=self._query_notes(request.query),
                    duplicates=duplicates[i],
                )
            )
        return out

    def _read_store(
        self,
        rows: Sequence[int],
        lookups: Sequence[Lookup],
        users: list[dict[str, Any] | None],
        products: list[Mapping[str, Any] | None],
        reasons: list[list[str]],
    ) -> str | None:
        """One read of the store for the requests at `rows`; their answers go to `users` and `products`. On
        failure each of them is told why, and the error is returned."""
        if not rows or self.store is None:
            return None
        try:
            answers = self.store.lookup_batch(lookups)
        except ServiceUnavailable as exc:
            for i in rows:
                reasons[i].append(f"{UNAVAILABLE}: {exc}")
            return str(exc)
        for i, (user, columns) in zip(rows, answers, strict=True):
            users[i], products[i] = user, columns
        return None

    def _query_notes(self, query: str | None) -> list[str]:
        """A note when the text models read only the start of a long query (their token limit)."""
        if not query:
            return []
        models = [self.ranker.bert, *(getattr(s, "encoder", None) for s in self.ranker.signals.values())]
        models = [m for m in models if m is not None and hasattr(m, "tokenizer")]
        if not models:
            return []
        limit = min(int(m.max_length) for m in models)
        # a token covers at least one byte of the text (WordPiece and byte-level BPE alike): a query of at
        # most `limit - 2` bytes fits beside the two special tokens, and is not tokenized a second time here
        if len(query.encode("utf-8")) <= limit - 2:
            return []
        tokens = len(models[0].tokenizer(query, add_special_tokens=True)["input_ids"])
        if tokens <= limit:
            return []
        # the cross-encoder reads the query beside a product title, so it keeps less than its own limit
        return [
            f"query truncated: it has {tokens - 2} tokens; the text models read at most the first {limit - 2}"
        ]

    def _score(self, prepared: Sequence[_Prepared]) -> pd.DataFrame:
        examples = [p.example for p in prepared if p.example.candidates]
        if not examples:
            return pd.DataFrame(columns=["qid", "product_id", "score", "rank"])
        parts = [p.features for p in prepared if p.features is not None and p.example.candidates]
        features = concat_columns(parts) if parts else None
        frame = self.ranker.frame(examples, features, rerank_k=self.rerank_k)
        # contributions of the products the answers list only (a LambdaMART's cost most per row)
        explain_top = max(p.request.k for p in prepared)
        return self.ranker.score(frame, rerank_k=self.rerank_k, explain_top=explain_top)

    def _response(self, prepared: _Prepared, results: list[RankedProduct]) -> RankResponse:
        return RankResponse(
            results=results,
            model=self.model,
            degraded=bool(prepared.reasons),
            degraded_reasons=prepared.reasons,
            cold_start=prepared.cold_start,
            retrieved=prepared.retrieved,
            unknown_candidates=prepared.unknown,
            duplicate_candidates=prepared.duplicates,
            notes=prepared.notes,
        )


def _top_products(scored: pd.DataFrame, k: int) -> dict[str, list[RankedProduct]]:
    """Each query's top `k` rows of a scored frame (sorted by qid, then rank) as ranked products.

    Whole columns at once, for the batch: row by row (`to_dict("records")`), or a frame per query, was most
    of a response's cost."""
    if not len(scored):
        return {}
    top = scored[scored["rank"].to_numpy() <= k]
    columns = [c for c in top.columns if c.startswith(CONTRIBUTION_PREFIX)]
    names = [c.removeprefix(CONTRIBUTION_PREFIX) for c in columns]
    qids = top["qid"].astype(str).tolist()
    rows = zip(
        top["product_id"].astype(str).tolist(),
        top["rank"].to_numpy(dtype=int).tolist(),
        top["score"].to_numpy(dtype=float).tolist(),
        top[columns].to_numpy(dtype=float).tolist(),
        strict=True,
    )
    answers: dict[str, list[RankedProduct]] = {}
    for qid, (product, rank, score, parts) in zip(qids, rows, strict=True):
        answers.setdefault(qid, []).append(
            RankedProduct(
                product_id=product, rank=rank, score=score, contributions=dict(zip(names, parts, strict=True))
            )
        )
    return answers


def _known_candidates(
    given: Sequence[str], catalog: Mapping[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """The given ids in the catalog (first occurrences, in order), those it lacks, and the repeated ones."""
    known: list[str] = []
    unknown: list[str] = []
    repeated: dict[str, None] = {}
    seen: set[str] = set()
    for pid in given:
        if pid in seen:
            repeated[pid] = None
        elif pid in catalog:
            known.append(pid)
        else:
            unknown.append(pid)
        seen.add(pid)
    return known, unknown, list(repeated)


def _history(request: RankRequest, user: Mapping[str, Any]) -> tuple[str, ...]:
    """Oldest first: the request's history, else the store's recent products (which are newest first)."""
    if request.history is not None:
        return tuple(request.history)
    recent = user.get("user_recent_products") or ()
    return tuple(str(p) for p in reversed(list(recent)))


def _distinct_qid_groups(prepared: Sequence[_Prepared]) -> list[list[int]]:
    """Indices split into groups whose requests have distinct ids: a frame's rows are keyed by qid, and two
    requests for the same query must not be scored as one."""
    groups: list[list[int]] = []
    seen: list[set[str]] = []
    for i, p in enumerate(prepared):
        qid = p.example.qid
        for group, qids in zip(groups, seen, strict=True):
            if qid not in qids:
                group.append(i)
                qids.add(qid)
                break
        else:
            groups.append([i])
            seen.append({qid})
    return groups


def serving_workers(environ: Mapping[str, str] | None = None) -> int:
    """How many worker processes serve the ranker: FUSIONRANK_WORKERS, default 1, at most the CPU count.

    One Python process runs one request's Python at a time; a second worker uses a second core for it.
    """
    env = os.environ if environ is None else environ
    raw = env.get("FUSIONRANK_WORKERS", "").strip()
    if not raw:
        return 1
    try:
        workers = int(raw)
    except ValueError as exc:
        raise ConfigError(f"FUSIONRANK_WORKERS must be a whole number, got {raw!r}") from exc
    cores = _cpu_count()
    if not 1 <= workers <= cores:
        raise ConfigError(
            f"FUSIONRANK_WORKERS must be between 1 and the {cores} CPU cores here, got {workers}"
        )
    return workers


def torch_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """Torch threads per worker: 1, or None when OMP_NUM_THREADS is set (torch takes that, as asked).

    A served request's forward passes are small (one short context, a few re-ranked pairs), and a worker's
    other threads need the cores too: its event loop parses HTTP while the model runs. With two torch threads
    on this 2-core CPU a Home Depot request's preparation (retrieval, lookups, context encoding) took 19-29 ms
    against 10 ms with one, most likely because torch's idle threads spin on the core the rest needs.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    return 1


def fusion_threads(environ: Mapping[str, str] | None = None, model_process: bool = True) -> int:
    """LightGBM threads of a LambdaMART fusion's predictions: the CPUs divided among the processes that run
    Python (each worker, and each worker's model process where there is one), at least 1.

    LightGBM releases the GIL for a whole prediction, so a second thread helps where a core would otherwise
    wait: when one worker ran the model itself on this 2-core CPU (LightGBM's own TreeSHAP then), it served a
    Home Depot LambdaMART bundle (100 given candidates, 10 clients) at 152.8 and 158.9 req/s with 2 threads
    against 125.3 and 128.2 with 1. With a model process the worker's HTTP side needs that core: 1 thread
    served 207.5 and 191.2 req/s (p99 83.2, 79.3 ms) against 167.2 and 174.5 (p99 106.8, 97.8) with 2,
    in alternating runs (`benchmarks/bench_serving.py --client wrk`).
    """
    processes = serving_workers(environ) * (2 if model_process else 1)
    return max(1, _cpu_count() // processes)


def limit_threads(threads: int) -> None:
    """Run torch, the BLAS numpy calls (OpenBLAS) and OpenMP (LightGBM) of this process on `threads` threads.

    OpenBLAS otherwise starts a thread per core for a product over the whole catalog (dense retrieval), and
    its waiting threads spin: with two workers on 2 cores, four BLAS threads competed for the cores, and
    Home Depot's retrieving requests were served at 80 req/s against 115 with one worker
    (`benchmarks/bench_hybrid.py --workers 2`, session 6, before this limit).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    # BLAS and OpenMP (LightGBM's predictions run on OpenMP threads too)
    threadpool_limits(limits=threads)


def _cpu_count(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's limit,
    which the affinity does not show: a pod limited to 2 CPUs on a 32-core node sees 32)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def resolve_rerank_k(ranker: Ranker, settings: ServingSettings) -> int | None:
    """The cross-encoder's per-request budget: the setting, else the bundle's serving config for the
    device the cross-encoder runs on (`rerank_k_cpu` / `rerank_k_gpu`), else every candidate (None)."""
    if settings.rerank_k is not None:
        return settings.rerank_k
    config = ranker.manifest.get("serving") or {}
    device = getattr(getattr(ranker.bert, "device", None), "type", "cpu")
    value = config.get("rerank_k_gpu" if device == "cuda" else "rerank_k_cpu")
    return None if value is None else int(value)


def retrieve_candidates(ranker: Ranker, context: Context, k: int) -> list[str]:
    """Candidates for a request without any, as the pipeline built its evaluation candidates.

    BM25's top `k` for a query, then item-kNN's for a history; with a dense signal and the bundle's
    `hybrid_k` (serving config), those of the bi-encoder's top `hybrid_k` that they missed are added (hybrid
    retrieval: up to `k + hybrid_k` candidates); the most popular products fill the list up to `k`, so a
    cold-start user without a query gets popularity.
    """
    return retrieve_candidates_batch(ranker, [context], k)[0]


def retrieve_candidates_batch(ranker: Ranker, contexts: Sequence[Context], k: int) -> list[list[str]]:
    """`retrieve_candidates` of each context; the dense retrieval of all of them in one pass over the
    product embeddings (`DenseSignal.retrieve_batch`), the part whose cost a batch shares."""
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.cf import ItemKNNSignal
    from fusionrank.signals.dense import DenseSignal, dense_extras_batch
    from fusionrank.signals.popularity import PopularitySignal

    signals = list(ranker.signals.values())
    bm25 = [s for s in signals if isinstance(s, BM25Signal)][:1]
    item_knn = [s for s in signals if isinstance(s, ItemKNNSignal)][:1]
    popular = [s for s in signals if isinstance(s, PopularitySignal)]
    popular.sort(key=lambda s: (s.name != POPULARITY_NAME, s.name))
    dense = [s for s in signals if isinstance(s, DenseSignal)][:1]
    hybrid_k = int((ranker.manifest.get("serving") or {}).get("hybrid_k", 0))

    def take(picked: dict[str, None], context: Context, retriever: Any, limit: int, count: int) -> None:
        if len(picked) >= limit:  # full already: a retrieval would rank the whole catalog for nothing
            return
        # ask for more than missing: hits outside the catalog or already picked are skipped
        added = 0
        for pid, _ in retriever.retrieve(context, count + len(picked)):
            if len(picked) >= limit or added >= count:
                return
            if pid in ranker.titles and pid not in picked:
                picked[pid] = None
                added += 1

    chosen: list[dict[str, None]] = []
    for context in contexts:
        picked: dict[str, None] = {}
        for retriever in (bm25 if context.query else []) + (item_knn if context.history else []):
            take(picked, context, retriever, k, k)
        chosen.append(picked)
    if dense and hybrid_k:
        rows = [i for i, c in enumerate(contexts) if c.query or c.history]
        texts, haves = [contexts[i] for i in rows], [chosen[i] for i in rows]
        extras = dense_extras_batch(dense[0], texts, haves, hybrid_k)
        for i, found in zip(rows, extras, strict=True):
            for pid in found:
                if pid in ranker.titles:
                    chosen[i][pid] = None
    for context, picked in zip(contexts, chosen, strict=True):
        for retriever in popular[:1]:
            take(picked, context, retriever, k, k)
    return [list(picked) for picked in chosen]


def online_feature_frame(qid: str, user: Mapping[str, Any], products: pd.DataFrame) -> pd.DataFrame:
    """One request's feature rows as the candidate frame wants them: qid, product_id, `f_<name>`.

    Numeric features only (the fusion reads numbers); user features are repeated on every product row.
    """
    ids = products["product_id"].astype(str).tolist()
    return pd.DataFrame(online_feature_columns(qid, user, ids, products))


def online_feature_columns(
    qid: str, user: Mapping[str, Any], product_ids: Sequence[str], products: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The columns of `online_feature_frame` for one request, from the products' feature columns (aligned
    with `product_ids`; a `product_id` column among them is skipped): arrays, no DataFrame."""
    rows = len(product_ids)
    columns: dict[str, np.ndarray] = {
        "qid": np.full(rows, qid, dtype=object),
        "product_id": np.array([str(p) for p in product_ids], dtype=object),
    }
    for name in products:
        values = products[name]
        if name != "product_id" and pd.api.types.is_numeric_dtype(values):
            if isinstance(values, np.ndarray):
                columns[f"{FEATURE_PREFIX}{name}"] = values.astype(float)
            else:
                columns[f"{FEATURE_PREFIX}{name}"] = values.to_numpy(dtype=float, na_value=np.nan)
    for name, value in user.items():
        if isinstance(value, int | float | np.number) and not isinstance(value, bool):
            columns[f"{FEATURE_PREFIX}{name}"] = np.full(rows, float(value))
    return columns


def concat_columns(parts: Sequence[Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """The rows of several requests' feature columns (`online_feature_columns`: each has qid and product_id)
    as one frame, built once, NaN where a request lacks a feature: `pd.concat` of a DataFrame per request
    cost about a millisecond a request."""
    names = list(dict.fromkeys(name for part in parts for name in part))
    columns = {
        name: np.concatenate(
            [part[name] if name in part else np.full(len(part["qid"]), np.nan) for part in parts]
        )
        for name in names
    }
    return pd.DataFrame(columns)
