"""The whole DAG under kfp.local on small samples of real data with a tiny BERT: which branch ran, and what
the registry holds afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fusionrank.data.contract import Tables
from fusionrank.orchestration import SMOKE_PARAMS, LocalRun, run_local
from fusionrank.registry import Registry, local_registry_uri
from fusionrank.signals.base import load_signal
from fusionrank.steps import read_splits, training_pairs
from pipelines.training import DEFAULT_GATE

pytestmark = pytest.mark.slow

SMALL = SMOKE_PARAMS


def gate(force: str) -> dict:
    return {**DEFAULT_GATE, "force": force}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return tmp_path_factory.mktemp("fusionrank-home")


@pytest.fixture(scope="module")
def approved(home: Path, data_dir: Path) -> LocalRun:
    return run_local(
        {"source": "homedepot", "data_dir": str(data_dir), "gate_config": gate("approve"), **SMALL}, home
    )


@pytest.fixture(scope="module")
def rejected(home: Path, data_dir: Path, approved: LocalRun) -> LocalRun:
    return run_local(
        {"source": "homedepot", "data_dir": str(data_dir), "gate_config": gate("reject"), **SMALL}, home
    )


def registry(home: Path) -> Registry:
    return Registry(local_registry_uri(home), "fusionrank-homedepot")


def test_approved_run_packages_and_registers_a_champion(approved: LocalRun, home: Path) -> None:
    assert approved.error is None, approved.error
    assert approved.outcome == "registered:1"
    assert approved.ran("package")
    assert approved.ran("register")
    assert not approved.ran("report-rejection")
    versions = registry(home).versions()
    assert [v.version for v in versions] == [1]
    champion = versions[0]
    assert "champion" in champion.aliases
    assert len(champion.tags["data_hash"]) == 64
    assert champion.tags["feature_service"].startswith("fusionrank_ranker_")
    assert champion.tags["git_revision"]
    evaluation = json.loads(approved.artifact("evaluate", "evaluation").read_text())
    assert 0.0 <= evaluation["candidate"]["ndcg@10"] <= 1.0
    assert evaluation["champion"] is None
    # the bi-encoder step: dense scores on every candidate, hybrid rows, recall of each generator
    assert set(evaluation["generator_recall"]["test"]) == {"bm25", "dense", "rrf@100", "hybrid@100+20"}
    assert "recall@100" in approved.artifact("evaluate", "table").read_text()
    # issue #11's distillation figure: BM25, teacher and student, alone and fused with BM25
    distillation = evaluation["distillation"]
    assert distillation["requests"] == evaluation["report"]["slices"]["all"]["n_queries"]
    assert set(distillation["readings"]) == {"alone", "fused with bm25"}
    for reading in distillation["readings"].values():
        assert reading["teacher_gain"] == pytest.approx(reading["bert"] - reading["bm25"])
    table = approved.artifact("evaluate", "table").read_text()
    assert "Distillation: the bi-encoder against its teacher" in table
    report = approved.artifact("evaluate", "report")
    assert {p.name for p in report.iterdir()} >= {"report.md", "report.json", "ndcg10.png"}
    assert "Kaggle" in (report / "report.md").read_text()  # the published figures of the source
    # Kaggle's metric beside it: the regression head's RMSE on the judged test pairs, and a constant's
    rmse = json.loads((report / "report.json").read_text())["datasets"]["homedepot"]["rmse"]
    assert [name.split(",")[0] for name in rmse] == [
        "cross-encoder regression head",
        "validation-mean relevance",
    ]
    assert all(0.0 < value < 2.0 for value in rmse.values())
    # listed once, beside Kaggle's figures
    assert (report / "report.md").read_text().count("cross-encoder regression head") == 1
    frames = approved.artifact("finetune-biencoder", "dense_frames")
    test = pd.read_parquet(frames / "test.parquet")
    before = pd.read_parquet(approved.artifact("finetune-bert", "scored_frames") / "test.parquet")
    assert test["s_dense"].notna().all()
    assert len(test) >= len(before)
    bundle = approved.artifact("package", "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "dense" in manifest["signals"]
    assert manifest["serving"]["hybrid_k"] == 20
    assert manifest["serving"]["retrieve_k"] == SMALL["candidates_k"]  # the server retrieves as evaluated
    assert (bundle / "signals" / "dense" / "embeddings.npy").is_file()


def test_rejected_run_registers_nothing_and_says_why(rejected: LocalRun, home: Path) -> None:
    assert rejected.error is None, rejected.error
    assert rejected.outcome == "rejected"
    assert rejected.ran("report-rejection")
    assert not rejected.ran("package")
    assert not rejected.ran("register")
    assert [v.version for v in registry(home).versions()] == [1], "a rejected run must not register"
    assert registry(home).champion().version == 1, "a rejected run must not touch the champion"
    decision = json.loads(rejected.artifact("gate", "decision").read_text())
    assert decision["approved"] is False
    assert any("force" in reason for reason in decision["reasons"])
    # the second run compared itself with the first run's champion, on its own test requests
    evaluation = json.loads(rejected.artifact("evaluate", "evaluation").read_text())
    assert evaluation["champion_version"] == 1
    assert evaluation["champion"] is not None


def test_invalid_data_stops_at_validation_with_the_report(tmp_path: Path) -> None:
    home = tmp_path / "home"
    products = pd.DataFrame({"product_id": ["a", "b", "b", "c"], "title": ["x", "y", "z", " "]}).astype(
        "string"
    )
    products.to_parquet(tmp_path / "products.parquet")
    judgments = pd.DataFrame({"query": ["q1"] * 6 + ["q2"] * 6, "product_id": ["a", "b", "c"] * 4})
    judgments["relevance"] = [1.0, 2.0, 3.0, 2.0, 2.0, 9.0] * 2
    judgments.astype({"query": "string", "product_id": "string"}).to_parquet(tmp_path / "judgments.parquet")
    run = run_local({"source": f"parquet:{tmp_path}", "gate_config": gate("auto"), **SMALL}, home)
    print(run.error)
    assert run.error is not None
    assert "assert-valid" in run.error
    assert run.artifact("validate", "report") is not None
    result = json.loads(run.artifact("validate", "result").read_text())
    assert result["success"] is False
    failed = {(f["table"], f["column"]) for f in result["failures"]}
    assert ("products", "product_id") in failed
    assert ("judgments", "relevance") in failed
    assert not run.ran("split")
    assert not run.ran("finetune-bert")
    assert registry(home).versions() == []


def test_the_distillation_benchmark_retrains_the_student_on_a_run_without_writing_to_it(
    approved: LocalRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distillation.py"
    spec = importlib.util.spec_from_file_location("bench_distillation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_dir = approved.run_dir
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    given = ["--run", str(run_dir), "--out", str(tmp_path / "refused")]
    assert bench.main([*given, "-p", "bi_teacher_scale=big"]) == 2
    assert bench.main([*given, "-p", "candidates_k=5"]) == 2
    assert bench.main([*given, "-p", "bi_distill_loss=pairwise"]) == 2
    assert bench.main([*given, "-p", "bi_group_size=0"]) == 2
    assert bench.main([*given, "-p", "bi_hard_pool=0"]) == 2
    refusals = capsys.readouterr().err
    assert "candidates_k" in refusals
    assert "bi_teacher_scale" in refusals
    assert "'bi_distill_loss' takes one of margin_mse, listwise" in refusals
    assert "group_size must be at least 1" in refusals
    assert "hard_pool at least 1" in refusals
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "weighted"
    args = [
        "--run",
        str(run_dir),
        "--out",
        str(out),
        "-p",
        "bi_distill_weight=3",
        "-p",
        "bi_teacher_scale=2",
        "-p",
        "bi_group_size=5",
        "-p",
        "bi_negatives=2",
        "-p",
        "bi_hard_pool=3",
        "-p",
        "bi_distill_loss=listwise",
    ]
    assert bench.main(args) == 0
    assert "Distillation: the bi-encoder against its teacher" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["bi_max_length"] == SMALL["bi_max_length"]  # the run's, not the default
    settings = json.loads((out / "signals" / "dense" / "model" / "biencoder.json").read_text())["settings"]
    assert (settings["distill_weight"], settings["teacher_scale"], settings["group_size"]) == (3.0, 2.0, 5)
    assert settings["distill_loss"] == "listwise"
    # the teacher scored the judged pairs of the sampled queries plus up to 2 unjudged of BM25's top 3 each;
    # the counts with either parameter left at its default (7, 30) differ, so both must have arrived
    _, parts = read_splits(run_dir / "split" / "splits")
    tables = Tables.read(run_dir / "ingest" / "dataset")
    bm25 = load_signal(run_dir / "candidates" / "signals" / "bm25")
    seed = summary["arguments"]["seed"]

    def pair_count(negatives: int, hard_pool: int) -> int:
        pairs = training_pairs(
            tables, "search", parts["train"], SMALL["bi_max_train_samples"], seed, bm25, negatives, hard_pool
        )
        return len(pairs)

    judged = training_pairs(tables, "search", parts["train"], SMALL["bi_max_train_samples"], seed)
    assert summary["figures"]["train_pairs"] == pair_count(2, 3)
    assert pair_count(2, 3) not in {len(judged), pair_count(7, 3), pair_count(2, 30)}
    assert settings["max_length"] == SMALL["bi_max_length"]
    # the same BM25 on the same test requests as the run's own figure; only the student changed
    run_figure = json.loads(approved.artifact("evaluate", "evaluation").read_text())["distillation"]
    for reading, values in summary["distillation"]["readings"].items():
        assert values["bm25"] == pytest.approx(run_figure["readings"][reading]["bm25"])
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
