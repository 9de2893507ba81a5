"""Load test of the served ranker on loopback: p50/p99 latency and throughput of POST /rank with 100
candidates from 10 concurrent clients, adaptive batching on and off, in one run.

    .venv/bin/python benchmarks/bench_serving.py [--bert minilm|tiny] [--fusion cascade] [--requests 300]

It builds a benchmark bundle from Home Depot (BM25, popularity and the Feast product features of a real
SQLite online store; a cross-encoder with MiniLM-L6's size and an untrained head, since latency, not
quality, is measured here; the selected fusion, by default the cascade that runs BERT on each request's top
`--cascade-k`), packages it with `fusionrank.packaging.save_to_bentoml` into a temporary BentoML home, then
serves the Bento with `bentoml serve` twice (FUSIONRANK_ADAPTIVE_BATCHING=on, then off) and prints one
table. Each phase is bounded by `--requests` and `--max-seconds`. `--bundle DIR` benchmarks an existing
ranker bundle instead (its requests then use its catalog's first products as candidates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MINILM_LAYERS = 6


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_bundle(
    work: Path, data_dir: Path, bert: str, fusion: str, cascade_k: int, seed: int
) -> tuple[Path, list]:
    """A Home Depot bundle and the benchmark's requests (test queries with 100 BM25 candidates each)."""
    import pandas as pd

    from fusionrank.bert import default_base_model, make_tiny_bert
    from fusionrank.context import Context, RankingExample
    from fusionrank.data.contract import Tables
    from fusionrank.data.ingest import load_tables
    from fusionrank.features import OnlineFeatures, materialize_features
    from fusionrank.fusion import fit_cascade, fit_lambdamart, fit_weighted
    from fusionrank.ranker import signal_frame, write_bundle
    from fusionrank.serving_logic import online_feature_frame
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.popularity import PopularitySignal

    tables, _ = load_tables("homedepot", data_dir)
    judgments = tables.judgments
    queries = np.random.default_rng(seed).permutation(np.sort(judgments["query"].unique()))
    fit_queries, bench_queries = queries[:80], queries[80:580]
    train = judgments[~judgments["query"].isin(set(bench_queries))]
    started = time.perf_counter()
    signals = {"bm25": BM25Signal.fit(tables.products), "popularity": PopularitySignal.fit_judgments(train)}
    _log(f"signals fitted in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    info = materialize_features(
        Tables(products=tables.products, judgments=train), work / "store", train_judgments=train
    )
    online = OnlineFeatures.from_info(info)
    _log(f"Feast store materialized in {time.perf_counter() - started:.0f} s")

    def candidates(query: str) -> list[str]:
        hits = [pid for pid, _ in signals["bm25"].retrieve(Context(query=query), 100)]
        fill = [pid for pid, _ in signals["popularity"].retrieve(Context(), 200) if pid not in set(hits)]
        return [*hits, *fill][:100]

    by_query = train.groupby("query")
    examples = []
    for query in fit_queries:
        rows = by_query.get_group(query)
        gains = dict(zip(rows["product_id"], rows["relevance"].astype(float), strict=True))
        examples.append(RankingExample(Context(query=str(query)), candidates(str(query)), gains))
    features = pd.concat(
        [online_feature_frame(e.qid, *online.lookup(None, e.candidates)) for e in examples], ignore_index=True
    )
    frame = signal_frame(examples, signals, features)
    # BERT's fitted weight does not change its cost; an arbitrary score column serves the fit
    frame["s_bert"] = np.random.default_rng(seed).random(len(frame))
    columns = [c for c in frame.columns if c.startswith(("s_", "f_")) and frame[c].nunique() > 1]
    first = [c for c in columns if c != "s_bert"]
    models = {
        "weighted": fit_weighted(frame, columns),
        "cascade": fit_cascade(frame, first, rerank_signal="s_bert", k=cascade_k),
        "lambdamart": fit_lambdamart(frame, columns, seed=seed),
    }
    for name, signal_ in signals.items():
        signal_.save(work / "signals" / name)
    for kind, model in models.items():
        model.save(work / "fusion" / kind)
    bert_dir = _bert(work / "bert", bert, default_base_model, make_tiny_bert)
    manifest = {
        "mode": "search",
        "signals": sorted(signals),
        "fusions": sorted(models),
        "selected_fusion": fusion,
        "fusion_signals": columns,
        "feature_service": info.feature_service,
        "feature_store": str(work / "store"),
        "data_hash": "benchmark",
        "git_revision": "benchmark",
    }
    bundle = write_bundle(
        work / "bundle", manifest, tables.products, work / "signals", work / "fusion", bert_dir, frame
    )
    requests = [{"query": str(q), "candidates": candidates(str(q)), "k": 10} for q in bench_queries]
    return bundle, requests


def _bert(directory: Path, kind: str, default_base_model, make_tiny_bert) -> Path:
    if kind == "tiny":
        return make_tiny_bert(directory)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = default_base_model()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    assert model.config.num_hidden_layers == MINILM_LAYERS
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return directory


def bundle_requests(bundle: Path, count: int) -> list[dict]:
    """Requests for an existing bundle: a few words of a title as the query, 100 catalog products."""
    import pandas as pd

    products = pd.read_parquet(bundle / "products.parquet")
    ids, titles = products["product_id"].astype(str).tolist(), products["title"].astype(str).tolist()
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(count):
        picked = rng.choice(len(ids), size=min(100, len(ids)), replace=False)
        query = " ".join(titles[picked[0]].split()[:3])
        requests.append({"query": query, "candidates": [ids[i] for i in picked], "k": 10})
    return requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bento: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    bentoml = REPO / ".venv" / "bin" / "bentoml"
    process = subprocess.Popen(
        [str(bentoml), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"bentoml serve not ready in 180 s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def load(url: str, requests: list[dict], count: int, concurrency: int, max_seconds: float) -> dict:
    """`concurrency` closed-loop clients send `count` requests (or stop at `max_seconds`)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def client_loop() -> None:
            nonlocal sent
            while sent < count and time.perf_counter() - started < max_seconds:
                body = requests[sent % len(requests)]
                sent += 1
                begin = time.perf_counter()
                try:
                    response = await client.post("/rank", json=body)
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {response.text[:100]}")
                        continue
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": sent,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(elapsed, 1),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
    }


WRK_SCRIPT = """
local bodies = {%s}
local sent = 0
request = function()
  sent = sent + 1
  return wrk.format("POST", "/rank", {["Content-Type"] = "application/json"}, bodies[(sent %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FUSIONRANK %%d %%d %%d %%d %%f %%f\\n", summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(url: str, requests: list[dict], concurrency: int, seconds: float, work: Path) -> dict:
    """The same closed-loop load from wrk (C, one thread, `concurrency` connections) for `seconds`: a load
    generator that leaves the server's second core to the server (the Python client takes most of one).
    Each connection sends the next request as soon as its answer arrives; wrk counts the time per answer."""
    import shutil

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk needs wrk on the PATH (Debian: apt-get install wrk)")
    bodies = ",".join(f"[==[{json.dumps(body)}]==]" for body in requests)
    script = work / "rank.lua"
    script.write_text(WRK_SCRIPT % bodies)
    command = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s"]
    done = subprocess.run([*command, "-s", str(script), url], capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("FUSIONRANK "))
    sent, failed, status, micros, p50, p99 = line.split()[1:]
    elapsed = int(micros) / 1e6
    errors = int(failed) + int(status)
    return {
        "requests": int(sent),
        "ok": int(sent) - errors,
        "errors": errors,
        "first_errors": [f"{status} non-2xx answers, {failed} socket errors"] if errors else [],
        "seconds": round(elapsed, 1),
        "throughput_rps": round((int(sent) - errors) / elapsed, 1),
        "p50_ms": round(float(p50) / 1000, 1),
        "p99_ms": round(float(p99) / 1000, 1),
    }


def mean_batch_size(url: str) -> float | None:
    """Requests per model call of /rank, from the server's batch size histogram (warm-up included)."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fusionrank_rank_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("fusionrank_rank_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return round(total / count, 2) if count else None


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's process settings, as both load benchmarks take them."""
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of the server; 0: the server's own choice (one torch thread per worker)",
    )
    parser.add_argument("--workers", type=int, default=1, help="FUSIONRANK_WORKERS of the server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="benchmark this ranker bundle instead of building one")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--bert", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--fusion", choices=["cascade", "lambdamart", "weighted"], default="cascade")
    parser.add_argument("--cascade-k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300, help="measured requests per phase")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time limit of each phase")
    parser.add_argument(
        "--client",
        choices=["python", "wrk"],
        default="python",
        help="load generator: python (httpx, bounded by --requests and --max-seconds) or wrk (runs for "
        "--max-seconds; needs wrk)",
    )
    add_server_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-") as tmp:
        work = Path(tmp)
        home = work / "bentoml"
        env = {
            "BENTOML_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "FUSIONRANK_WORKERS": str(args.workers),
            # one batch's contexts: a request's text is encoded once, but never found cached from an
            # earlier request of the cycled request set (a bundle with a dense signal)
            "FUSIONRANK_CONTEXT_CACHE": "32",
        }
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        os.environ.update(env)
        from fusionrank.packaging import save_to_bentoml

        if args.bundle:
            bundle, requests = args.bundle, bundle_requests(args.bundle, 500)
        else:
            bundle, requests = build_bundle(
                work, args.data_dir, args.bert, args.fusion, args.cascade_k, seed=0
            )
        manifest = json.loads((bundle / "manifest.json").read_text())
        packaged = save_to_bentoml(bundle, manifest)
        _log(f"packaged {packaged['model']} as {packaged['bento']}")

        rows = []
        for batching in ("on", "off"):
            process, url = start_server(
                packaged["bento"],
                {**env, "FUSIONRANK_ADAPTIVE_BATCHING": batching},
                work / f"serve-{batching}.log",
            )
            try:
                asyncio.run(load(url, requests, args.warmup, args.concurrency, args.max_seconds))
                if args.client == "wrk":
                    figures = wrk_load(url, requests, args.concurrency, args.max_seconds, work)
                else:
                    figures = asyncio.run(
                        load(url, requests, args.requests, args.concurrency, args.max_seconds)
                    )
                figures["mean_batch_size"] = mean_batch_size(url) if batching == "on" else 1.0
            finally:
                stop_server(process)
            rows.append({"batching": batching, **figures})
            _log(f"batching {batching}: {figures}")

    setup = {
        "bundle": str(args.bundle) if args.bundle else f"homedepot, {args.bert} BERT",
        "fusion": manifest["selected_fusion"],
        "cascade_k": args.cascade_k if manifest["selected_fusion"] == "cascade" else None,
        "candidates_per_request": len(requests[0]["candidates"]),
        "concurrency": args.concurrency,
        "torch_threads": args.torch_threads or "1 per worker (server default)",
        "workers": args.workers,
        "model_process": os.environ.get("FUSIONRANK_MODEL_PROCESS", "on (default)"),
        "client": args.client,
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(setup))
    print("| batching | requests | errors | p50 ms | p99 ms | throughput req/s | requests per batch |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['batching']} | {row['ok']} | {row['errors']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['throughput_rps']} | {row['mean_batch_size']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
