"""Latency of one candidate-generation request: p50 / p99 over a bounded loop of single requests.

- search: BM25 top 100 over all 54,667 Home Depot products, for test-split queries;
- recommendation: item-kNN (and EASE) topped up by popularity, top 100 for one Amazon Games user.

Target: p99 under 10 ms on the 2-core development machine. Usage:
    .venv/bin/python benchmarks/bench_candidates.py [--data-dir ../shared/data] [--requests 500]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np

from fusionrank.context import Context
from fusionrank.data.sources import load_source
from fusionrank.signals import BM25Signal, EASESignal, FallbackRetriever, ItemKNNSignal, PopularitySignal
from fusionrank.signals.base import Retriever
from fusionrank.splits import split_recommendation, split_search, user_histories

TARGET_P99_MS = 10.0
WARMUP = 20
K = 100


def time_requests(
    retriever: Retriever, contexts: Sequence[Context], requests: int
) -> tuple[np.ndarray, np.ndarray]:
    """Wall and CPU milliseconds of each of `requests` single retrievals, cycling through `contexts`.

    CPU time shows the request's own work; wall time adds waiting for a core, which on a shared 2-core
    machine dominates the tail.
    """
    for context in contexts[:WARMUP]:
        retriever.retrieve(context, K)
    wall, cpu = np.empty(requests), np.empty(requests)
    for i in range(requests):
        context = contexts[i % len(contexts)]
        started, started_cpu = time.perf_counter(), time.thread_time()
        retriever.retrieve(context, K)
        cpu[i] = (time.thread_time() - started_cpu) * 1000
        wall[i] = (time.perf_counter() - started) * 1000
    return wall, cpu


def timed(label: str, build: Callable[[], object]) -> object:
    started = time.perf_counter()
    value = build()
    print(f"{label}: {time.perf_counter() - started:.1f} s")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="data directory (default: as `fusionrank data`)")
    parser.add_argument("--requests", type=int, default=500, help="timed requests per retriever")
    args = parser.parse_args()

    homedepot = load_source("homedepot", args.data_dir)
    bm25 = timed(
        f"fit BM25 over {len(homedepot.products)} products", lambda: BM25Signal.fit(homedepot.products)
    )
    queries = sorted(split_search(homedepot.judgments)["test"]["query"].unique())
    search_contexts = [Context(query=str(q)) for q in queries]

    games = load_source("amazon-games", args.data_dir)
    splits = split_recommendation(games.interactions)
    train = splits["train"]
    popularity = PopularitySignal.fit(train)
    knn = timed("fit item-kNN", lambda: ItemKNNSignal.fit(train, recency_decay=0.9))
    ease = timed("fit EASE", lambda: EASESignal.fit(train, l2=5000.0))
    histories = user_histories(splits, "test")
    users = np.random.default_rng(0).choice(histories.index.to_numpy(), size=1000, replace=False)
    user_contexts = [Context(user_id=str(u), history=histories[u]) for u in users]

    rows = [
        ("BM25 top-100, Home Depot query", bm25, search_contexts),
        ("item-kNN + popularity top-100, Games user", FallbackRetriever(knn, popularity), user_contexts),
        ("EASE + popularity top-100, Games user", FallbackRetriever(ease, popularity), user_contexts),
        ("popularity top-100, Games user", popularity, user_contexts),
    ]
    columns = ("p50 ms", "p99 ms", "max ms", "cpu p50", "cpu p99")
    print(f"\n{'request':43s} {'n':>4s} " + " ".join(f"{c:>7s}" for c in columns))
    for label, retriever, contexts in rows:
        wall, cpu = time_requests(retriever, contexts, args.requests)
        p50, p99 = np.percentile(wall, [50, 99])
        cpu50, cpu99 = np.percentile(cpu, [50, 99])
        print(f"{label:43s} {len(wall):4d} {p50:7.2f} {p99:7.2f} {wall.max():7.2f} {cpu50:7.2f} {cpu99:7.2f}")
    print(f"target: wall p99 < {TARGET_P99_MS:g} ms")


if __name__ == "__main__":
    main()
