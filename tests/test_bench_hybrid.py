"""benchmarks/bench_hybrid.py on a synthetic run folder: quality rows only (no bundle, no server)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hybrid", REPO / "benchmarks" / "bench_hybrid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass resolves its annotations through its module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _split(rng: np.random.Generator, which: str, hybrid: int) -> tuple[pd.DataFrame, ...]:
    """A search split: 12 queries, 10 BM25 candidates each (+ `hybrid` dense ones), one judged relevant
    product per query that no candidate list holds."""
    rows, qrels, contexts = [], [], []
    for q in range(12):
        qid = f"{which} query {q}"
        contexts.append({"qid": qid, "query": qid, "user_id": None, "history": []})
        for c in range(10 + hybrid):
            gain = float(rng.integers(0, 3)) if c % 3 == 0 else 0.0
            pid = f"p{q}-{c}"
            rows.append(
                {
                    "qid": qid,
                    "product_id": pid,
                    "gain": gain,
                    "s_bm25": rng.random() + (0.3 * gain if c < 10 else -1.0),
                    "s_popularity": rng.random(),
                    "f_popularity_7d": rng.random(),
                    "s_bert": rng.random() + gain,
                    "s_dense": rng.random() + 0.5 * gain,
                    "hybrid": c >= 10,
                }
            )
            if gain > 0:
                qrels.append({"qid": qid, "product_id": pid, "gain": gain})
        qrels.append({"qid": qid, "product_id": f"missed-{q}", "gain": 2.0})
    return pd.DataFrame(rows), pd.DataFrame(contexts), pd.DataFrame(qrels)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fusionrank.fusion import fit_weighted

    rng = np.random.default_rng(0)
    run = tmp_path_factory.mktemp("home") / "runs" / "fusionrank-training-synthetic"
    scored = run / "finetune-bert" / "scored_frames"
    dense = run / "finetune-biencoder" / "dense_frames"
    for folder in (scored, dense):
        folder.mkdir(parents=True)
    for which in ("valid", "test"):
        frame, contexts, qrels = _split(rng, which, hybrid=3)
        pre = frame[~frame["hybrid"]].drop(columns=["hybrid", "s_dense"]).reset_index(drop=True)
        for folder, part in ((scored, pre), (dense, frame.drop(columns="hybrid"))):
            part.to_parquet(folder / f"{which}.parquet", index=False)
            contexts.to_parquet(folder / f"{which}_contexts.parquet", index=False)
            qrels.to_parquet(folder / f"{which}_qrels.parquet", index=False)
        if which == "valid":
            valid = frame.drop(columns="hybrid")
    for folder in (scored, dense):
        (folder / "frames.json").write_text(json.dumps({"mode": "search", "signals": ["bm25", "popularity"]}))
    metrics = {
        "test_recall_at_100_bm25": 0.5,
        "test_recall_at_100_hybrid": 0.6,
        "valid_recall_at_100_dense": 0.2,
    }
    output = {"artifacts": {"metrics": {"artifacts": [{"name": "metrics", "metadata": metrics}]}}}
    (run / "finetune-biencoder" / "executor_output.json").write_text(json.dumps(output))
    signals = ["s_bm25", "s_popularity", "f_popularity_7d", "s_bert", "s_dense"]
    fusion = run / "fit-fusion" / "fusion"
    fit_weighted(valid, signals).save(fusion / "weighted")
    (fusion / "fusion.json").write_text(
        json.dumps({"fusions": ["weighted"], "selected": "weighted", "signals": signals})
    )
    return run


@pytest.fixture(scope="module")
def benchmarked(bench, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "bench.json"
    (result,) = bench.main(["--run", str(run_dir), "--no-latency", "--json", str(out)])
    return result, out


def test_quality_rows_on_a_synthetic_run(bench, benchmarked, run_dir):
    result, out = benchmarked
    rows = {row["key"]: row for row in result["quality"]["rows"]}
    assert list(rows) == [
        "traditional",
        "bi-encoder",
        *(f"fp32 k={k}" for k in ("0", "10", "20", "50", "all")),
    ]
    assert "s_dense" not in result["quality"]["traditional_columns"]
    assert "s_bert" not in result["quality"]["bi_encoder_columns"]
    assert "s_dense" in result["quality"]["bi_encoder_columns"]
    # one judged relevant product per query is in no candidate list: recall is below 1, and the hybrid
    # candidates (13 per query) can only add to the BM25 ones (10)
    assert rows["traditional"]["candidates"]["mean_candidates"] == 10
    assert rows["bi-encoder"]["candidates"]["mean_candidates"] == 13
    assert 0 < rows["traditional"]["candidates"]["recall"] <= rows["bi-encoder"]["candidates"]["recall"] < 1
    # k larger than every candidate list re-ranks all of them: the same ranking as k=all
    assert rows["fp32 k=50"]["ndcg@10"] == pytest.approx(rows["fp32 k=all"]["ndcg@10"])
    assert rows["traditional"]["p_value"] is None
    assert all(0 <= row["p_value"] <= 1 for row in list(rows.values())[1:])
    assert rows["fp32 k=0"]["compare_with"] == "bi-encoder"
    assert result["generator_recall"]["hybrid (recall@100)"] == {"test": 0.6}
    assert result["quality"]["recomputed"]["skipped"].startswith("no package/bundle")
    single = {item["key"]: item["ndcg@10"] for item in result["quality"]["single_signals"]}
    assert set(single) == {"s_bert fp32", "s_dense fp32"}
    assert result["default"]["chosen"] is None
    assert json.loads(out.read_text())["results"][0]["quality"]["rows"][0]["key"] == "traditional"
    assert "| 3 + cross-encoder top all, fp32 | fp32 k=all |" in bench.markdown(result)


def test_ndcg_counts_judged_products_the_candidates_missed(bench, benchmarked, run_dir):
    from fusionrank.champion import read_split_frames
    from fusionrank.evaluation import evaluate_runs
    from fusionrank.fusion import FusionModel, score_candidates
    from fusionrank.ranker import examples_from_frames

    result, _ = benchmarked
    test, contexts, qrels = read_split_frames(run_dir / "finetune-biencoder" / "dense_frames", "test")
    model = FusionModel.load(run_dir / "fit-fusion" / "fusion" / "weighted")
    scored = score_candidates(model, test)
    run = bench.ranked_run(scored)
    with_misses = evaluate_runs(examples_from_frames(test, contexts, qrels), {"r": run}, ("ndcg@10",))
    without = evaluate_runs(examples_from_frames(test, contexts), {"r": run}, ("ndcg@10",))
    all_row = next(r for r in result["quality"]["rows"] if r["key"] == "fp32 k=all")
    assert all_row["ndcg@10"] == pytest.approx(with_misses.mean("r", "ndcg@10"))
    assert all_row["ndcg@10"] < without.mean("r", "ndcg@10")


def test_default_is_the_best_ndcg_under_the_p99_target(bench):
    quality = {
        "rows": [
            {"key": "fp32 k=10", "ndcg@10": 0.5},
            {"key": "fp32 k=all", "ndcg@10": 0.6},
            {"key": "int8 k=10", "ndcg@10": 0.55},
        ]
    }
    latency = {
        "rows": [
            {"key": "fp32 k=10", "p99_ms": 80.0, "errors": 0, "rerank_k": 10, "int8": False},
            {"key": "fp32 k=all", "p99_ms": 900.0, "errors": 0, "rerank_k": None, "int8": False},
            {"key": "int8 k=10", "p99_ms": 95.0, "errors": 0, "rerank_k": 10, "int8": True},
        ]
    }
    chosen = bench.choose_default(quality, latency, 100.0)
    assert (chosen["chosen"], chosen["rerank_k_cpu"], chosen["int8"]) == ("int8 k=10", 10, True)
    assert bench.choose_default(quality, latency, 50.0)["chosen"] is None
    assert "none meets" in bench.choose_default(quality, latency, 50.0)["why"]
