"""benchmarks/bench_distillation.py refuses what it cannot measure before it trains anything (the run itself
is in tests/test_pipeline_local.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = REPO / "benchmarks" / "bench_distillation.py"
    spec = importlib.util.spec_from_file_location("bench_distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(bench, root: Path, mode: str) -> Path:
    """The folders a run that trained the cross-encoder has, with empty contents."""
    for part in bench.RUN_INPUTS + bench.TEACHER_INPUTS:
        (root / part).mkdir(parents=True, exist_ok=True)
    (root / "finetune-bert" / "scored_frames" / "frames.json").write_text(json.dumps({"mode": mode}))
    return root


def test_a_folder_without_a_trained_cross_encoder_is_named_with_what_it_lacks(
    bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run" / "ingest" / "dataset").mkdir(parents=True)
    assert bench.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "finetune-bert/bert" in err
    assert "candidates/signals" in err
    assert not (tmp_path / "out").exists()


def test_a_recommendation_run_is_refused_before_training(
    bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fake_run(bench, tmp_path / "run", "recommendation")
    assert bench.main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "recommendation run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_run_arguments_sit_between_the_defaults_and_the_overrides(bench, tmp_path: Path) -> None:
    run = fake_run(bench, tmp_path / "run", "search")
    (run / "pipeline-arguments.json").write_text(
        json.dumps({"bi_max_length": 32, "bi_epochs": 3, "candidates_k": 7})
    )
    arguments = bench.step_arguments(run, {"bi_epochs": 2})
    assert arguments["bi_max_length"] == 32  # the run's
    assert arguments["bi_epochs"] == 2  # the override's
    assert arguments["bi_distill_weight"] == 1.0  # the pipeline's default
    assert "candidates_k" not in arguments  # not the bi-encoder step's
