"""The `fusionrank` command as a user runs it: exit codes, readable errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

FUSIONRANK = [sys.executable, "-c", "from fusionrank.cli import run_cli; run_cli()"]


def fusionrank(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FUSIONRANK, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_every_command() -> None:
    result = fusionrank("--help")
    assert result.returncode == 0
    for command in (
        "data",
        "validate",
        "compile",
        "run",
        "submit",
        "schedule",
        "models",
        "promote",
        "rollback",
    ):
        assert command in result.stdout


def test_unknown_source_is_one_clear_line() -> None:
    result = fusionrank("data", "pull", "nope")
    assert result.returncode == 2
    assert "unknown data source 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_names_the_file(tmp_path: Path) -> None:
    result = fusionrank("validate", "homedepot", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "train.csv.zip: missing file of source 'homedepot'" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_ingest_then_validate_real_data(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "hd"
    result = fusionrank(
        "data", "ingest", "homedepot", "--out", str(out), "--max-queries", "30", "--data-dir", str(data_dir)
    )
    assert result.returncode == 0, result.stderr
    assert (out / "judgments.parquet").is_file()
    report = tmp_path / "report"
    result = fusionrank("validate", f"parquet:{out}", "--out", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((report / "validation.json").read_text())["success"] is True


def test_validate_fails_on_bad_rows_and_says_which(tmp_path: Path) -> None:
    pd.DataFrame({"product_id": ["a", "b", "b"], "title": ["x", "", "z"]}).astype("string").to_parquet(
        tmp_path / "products.parquet"
    )
    judgments = pd.DataFrame(
        {"query": ["q"] * 12, "product_id": ["a"] * 11 + ["zz"], "relevance": [2.0] * 12}
    )
    judgments.astype({"query": "string", "product_id": "string"}).to_parquet(tmp_path / "judgments.parquet")
    result = fusionrank("validate", f"parquet:{tmp_path}", "--out", str(tmp_path / "report"))
    assert result.returncode == 1
    text = " ".join(result.stdout.split())
    assert "product_id" in text
    assert "'zz'" in text
    assert "title" in text
    assert (tmp_path / "report" / "validation.html").is_file()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["promote", "7"], ["rollback"]])
def test_registry_errors_leave_aliases_alone(tmp_path: Path, command: list[str]) -> None:
    from fusionrank.registry import Registry, local_registry_uri

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    registry = Registry(local_registry_uri(tmp_path / "home"), "m")
    registry.promote(registry.register(bundle, "run-1", {}).version)
    before = {v.version: v.aliases for v in registry.versions()}
    result = fusionrank(*command, "--home", str(tmp_path / "home"), "--model", "m")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert ("no version 7" in result.stderr) or ("no 'previous' version" in result.stderr)
    assert {v.version: v.aliases for v in registry.versions()} == before == {1: ["challenger", "champion"]}


def test_pipeline_parameters_are_read_as_yaml_and_typed_as_the_pipeline_declares() -> None:
    from fusionrank.errors import ConfigError
    from fusionrank.orchestration import parse_params

    params = parse_params(["seq_max_seconds=900", "max_users=0", "promote=false", "source=amazon-games"])
    assert params == {"seq_max_seconds": 900.0, "max_users": 0, "promote": False, "source": "amazon-games"}
    assert isinstance(params["seq_max_seconds"], float)
    # YAML 1.1 reads 1e-4 as a string; a float parameter takes it as the number it is
    assert parse_params(["bert_learning_rate=1e-4"]) == {"bert_learning_rate": 1e-4}
    for bad in ("fast", "true"):
        with pytest.raises(ConfigError, match=f"'bert_learning_rate' takes a number, got '{bad}'"):
            parse_params([f"bert_learning_rate={bad}"])
    with pytest.raises(ConfigError, match="unknown pipeline parameter 'nope'"):
        parse_params(["nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_params(["max_users"])
    assert parse_params(["bi_distill_loss=listwise"]) == {"bi_distill_loss": "listwise"}
    with pytest.raises(ConfigError, match="'bi_distill_loss' takes one of margin_mse, listwise, got 'kl'"):
        parse_params(["bi_distill_loss=kl"])


def test_the_loss_names_the_cli_accepts_are_the_bi_encoders() -> None:
    from fusionrank.biencoder import DISTILL_LOSSES
    from fusionrank.orchestration import CHOICE_PARAMS

    assert CHOICE_PARAMS["bi_distill_loss"] == DISTILL_LOSSES


@pytest.mark.slow
def test_sigterm_to_a_local_run_stops_its_running_step(tmp_path: Path, data_dir: Path) -> None:
    """kfp.local runs each step as a child: a SIGTERM to `fusionrank run` alone must not leave it running."""
    import signal
    import time

    import psutil

    from fusionrank.orchestration import SMOKE_PARAMS

    params = [f"--param={k}={json.dumps(v)}" for k, v in {**SMOKE_PARAMS, "data_dir": str(data_dir)}.items()]
    command = [*FUSIONRANK, "run", "--local", "--home", str(tmp_path), *params]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, steps = time.monotonic() + 120, []
        while not steps and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
            children = psutil.Process(run.pid).children(recursive=True)
            steps = [c for c in children if "executor_main" in " ".join(c.cmdline())]
        assert steps, "no step started within 120 s"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(steps, timeout=5)
        assert alive == [], f"steps outlived the run: {[c.pid for c in alive]}"
    finally:
        if run.poll() is None:
            run.kill()
