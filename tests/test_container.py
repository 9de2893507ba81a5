"""The component image for real: built with podman (`make image`), the whole DAG run in it under kfp.local's
DockerRunner, every executor of the compiled pipeline run in it, and the faults a user meets on the way.

Set-up, once per session: `make image` installs podman, runc and debootstrap with apt-get when they are
missing, builds the base image and the wheelhouse if absent, and builds the image (cached: seconds when
nothing changed). A podman service is started on a socket in a temporary folder for the module and stopped
at the end; the tests reach it through DOCKER_HOST. The module skips only when podman is missing and
apt-get cannot run (not root), saying so.

Container run against subprocess run: the same arguments and seed on the same sample, one after the other
on this machine; the evaluation metrics must be equal to within 1e-9 (absolute). Both run the same code with
the same pinned wheels (torch's CPU build, numpy's OpenBLAS, LightGBM) on the same CPU with the same thread
count, so the figures come out identical in practice; the tolerance only absorbs the last-bit float noise a
different memory layout could bring to a summation, far below any difference that would mean something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.images import CPU_IMAGE, GPU_IMAGE
from fusionrank.errors import ConfigError, ServiceUnavailable
from fusionrank.orchestration import SMOKE_PARAMS, LocalRun, compile_pipeline, run_local
from fusionrank.registry import Registry, local_registry_uri
from fusionrank.revision import code_revision
from pipelines.training import DEFAULT_GATE

REPO = Path(__file__).resolve().parents[1]
PODMAN_CONF = REPO / "deploy" / "podman" / "containers.conf"
METRIC_TOLERANCE = 1e-9
SMALL = {**SMOKE_PARAMS, "source": "homedepot", "seed": 3}


def gate(force: str) -> dict:
    return {**DEFAULT_GATE, "force": force}


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        env={**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)},
        capture_output=True,
        text=True,
        timeout=600,
        check=check,
    )


def make_image() -> subprocess.CompletedProcess:
    return subprocess.run(["make", "image"], cwd=REPO, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="session")
def image() -> str:
    """The CPU image of this checkout, built by the project's own `make image` (from nothing if need be)."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("podman is not installed and apt-get needs root: run `make podman-tools` as root")
    built = make_image()
    assert built.returncode == 0, f"make image failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    return CPU_IMAGE


@pytest.fixture(scope="module")
def docker_host(image: str):
    """A podman service for the module, reached through DOCKER_HOST (as a user's own engine would be)."""
    from fusionrank.containers import podman_service

    previous = os.environ.get("DOCKER_HOST")
    with podman_service() as url:
        os.environ["DOCKER_HOST"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous


def registry(home: Path) -> Registry:
    return Registry(local_registry_uri(home), "fusionrank-homedepot")


def metrics(run: LocalRun) -> dict[str, float]:
    """Every number of the evaluation, flattened to dotted keys."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", json.loads(run.artifact("evaluate", "evaluation").read_text()))
    return flat


# ---------------------------------------------------------------------------------------------------------
# The image


@pytest.mark.slow
def test_a_second_build_without_changes_reuses_every_layer(image: str) -> None:
    before = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
    again = make_image()
    assert again.returncode == 0, again.stderr[-4000:]
    assert podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip() == before
    assert "Using cache" in again.stdout


@pytest.mark.slow
def test_image_runs_as_its_user_from_its_own_code_and_names_its_own_tag(image: str, tmp_path: Path) -> None:
    script = (
        "import os, components, fusionrank, pipelines; "
        "from components.images import CPU_IMAGE; "
        "print(os.getuid(), fusionrank.__file__, components.__file__, CPU_IMAGE)"
    )
    result = podman("run", "--rm", "--workdir", "/tmp", image, "python3", "-c", script)
    uid, package, components_file, named = result.stdout.split()
    assert uid == "10001"
    assert package.startswith("/opt/fusionrank/src/"), "the package must come from the image, not a checkout"
    assert components_file.startswith("/opt/fusionrank/components/")
    # The schedule Job compiles the pipeline inside the image: it must name this very image.
    assert named == image
    compiled = podman(
        "run",
        "--rm",
        image,
        "sh",
        "-c",
        "fusionrank compile --output /tmp/p.yaml >/dev/null && cat /tmp/p.yaml",
    ).stdout
    images = {
        executor["container"]["image"]
        for executor in next(yaml.safe_load_all(compiled))["deploymentSpec"]["executors"].values()
    }
    assert images == {CPU_IMAGE, GPU_IMAGE}
    label = podman(
        "image", "inspect", "--format", '{{index .Labels "org.opencontainers.image.revision"}}', image
    )
    assert label.stdout.strip() == code_revision()
    # Nothing a task may write is root-only: the image's user cannot write its code, but can write its home.
    writes = podman(
        "run", "--rm", image, "sh", "-c", "touch /opt/fusionrank/x 2>/dev/null; echo $?; touch ~/x; echo $?"
    )
    assert writes.stdout.split() == ["1", "0"]


def test_compiled_pipeline_names_the_tag_make_image_builds(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "-n", "image", f"IMAGES_PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"-t {CPU_IMAGE} " in result.stdout
    assert f"--build-arg GIT_REVISION={code_revision()}" in result.stdout
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    tags = {
        e["container"]["image"].rsplit(":", 1)[1] for e in docs[0]["deploymentSpec"]["executors"].values()
    }
    assert tags == {CPU_IMAGE.rsplit(":", 1)[1]}
    assert tags.pop().endswith(code_revision()[:12])


# ---------------------------------------------------------------------------------------------------------
# The DAG in containers


@pytest.fixture(scope="module")
def container_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("container-home")


@pytest.fixture(scope="module")
def container_approved(docker_host: str, container_home: Path, data_dir: Path) -> LocalRun:
    return run_local(
        {**SMALL, "data_dir": str(data_dir), "gate_config": gate("approve")},
        container_home,
        runner="container",
    )


@pytest.fixture(scope="module")
def subprocess_approved(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> LocalRun:
    home = tmp_path_factory.mktemp("subprocess-home")
    return run_local({**SMALL, "data_dir": str(data_dir), "gate_config": gate("approve")}, home)


@pytest.mark.slow
def test_container_run_goes_through_the_approved_branch_and_registers(
    container_approved: LocalRun, container_home: Path
) -> None:
    assert container_approved.error is None, container_approved.error
    assert container_approved.outcome == "registered:1"
    for step in ("ingest", "validate", "features", "finetune-bert", "gate", "package", "register"):
        assert container_approved.ran(step), step
    assert not container_approved.ran("report-rejection")
    champion = registry(container_home).champion()
    assert champion is not None
    assert champion.version == 1
    # The model was registered by the image's code: its lineage names the image's commit.
    assert champion.tags["git_revision"] == code_revision()


@pytest.mark.slow
def test_container_run_gives_the_subprocess_runs_metrics(
    container_approved: LocalRun, subprocess_approved: LocalRun
) -> None:
    assert subprocess_approved.error is None, subprocess_approved.error
    assert container_approved.error is None, container_approved.error
    print(
        f"\nDAG wall time: subprocess {subprocess_approved.seconds:.0f} s, "
        f"containers {container_approved.seconds:.0f} s"
    )
    ingest = [
        json.loads(r.artifact("ingest", "executor_output.json").read_text())
        for r in (container_approved, subprocess_approved)
    ]
    assert ingest[0]["parameterValues"]["data_hash"] == ingest[1]["parameterValues"]["data_hash"]
    in_container, in_subprocess = metrics(container_approved), metrics(subprocess_approved)
    assert in_container.keys() == in_subprocess.keys()
    assert any(key.endswith("ndcg@10") for key in in_container)
    differ = {
        key: (in_container[key], in_subprocess[key])
        for key in in_container
        if abs(in_container[key] - in_subprocess[key]) > METRIC_TOLERANCE
    }
    assert not differ, f"the container run's metrics differ from the subprocess run's: {differ}"


@pytest.mark.slow
def test_rejected_container_run_registers_nothing(
    docker_host: str, container_approved: LocalRun, container_home: Path, data_dir: Path
) -> None:
    rejected = run_local(
        {**SMALL, "data_dir": str(data_dir), "gate_config": gate("reject")},
        container_home,
        runner="container",
    )
    assert rejected.error is None, rejected.error
    assert rejected.outcome == "rejected"
    assert rejected.ran("report-rejection")
    assert not rejected.ran("package")
    assert not rejected.ran("register")
    assert [v.version for v in registry(container_home).versions()] == [1]
    assert registry(container_home).champion().version == 1


@pytest.mark.slow
def test_every_executor_of_the_compiled_pipeline_runs_in_the_image(
    container_approved: LocalRun, tmp_path: Path
) -> None:
    from fusionrank.containers import check_failures, check_image

    assert container_approved.error is None, container_approved.error
    pipeline_yaml = compile_pipeline(tmp_path / "pipeline.yaml")
    executors = set(next(yaml.safe_load_all(pipeline_yaml.read_text()))["deploymentSpec"]["executors"])
    results = check_image(container_approved.run_dir, tmp_path / "check", pipeline_yaml)
    assert {r.executor for r in results} == executors
    # the branch the run did not take is checked too
    assert "exec-report-rejection" in executors
    assert not check_failures(results), check_failures(results)
    finetune = next(r for r in results if r.executor == "exec-finetune-bert")
    assert finetune.image == CPU_IMAGE, "locally the GPU step runs in the CPU image"
    assert {"bert", "scored_frames", "metrics"} <= set(finetune.outputs)


# ---------------------------------------------------------------------------------------------------------
# Faults: each a clear message, and nothing registered


def test_no_podman_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    # run_local fills this in with git when unset, and git is not on the emptied PATH either
    monkeypatch.setenv("FUSIONRANK_GIT_REVISION", code_revision())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceUnavailable, match=r"podman is not installed.*make podman-tools"):
        run_local({**SMALL, "data_dir": str(data_dir)}, tmp_path / "home", runner="container")
    assert registry(tmp_path / "home").versions() == []


def test_unreachable_engine_names_the_command_that_starts_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nobody.sock'}")
    with pytest.raises(ServiceUnavailable, match=r"does not answer.*podman system service --time=0"):
        run_local({**SMALL, "data_dir": str(data_dir)}, tmp_path / "home", runner="container")
    assert registry(tmp_path / "home").versions() == []


@pytest.mark.slow
def test_missing_image_names_make_image(
    docker_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    import components.images

    monkeypatch.setattr(components.images, "CPU_IMAGE", f"{components.images.CPU_REPOSITORY}:0.0.0-notbuilt")
    with pytest.raises(ConfigError, match=r"0\.0\.0-notbuilt is not built.*make image"):
        run_local({**SMALL, "data_dir": str(data_dir)}, tmp_path / "home", runner="container")
    assert registry(tmp_path / "home").versions() == []


@pytest.mark.slow
def test_failing_component_reports_its_log_and_exit_code_through_the_cli(image: str, tmp_path: Path) -> None:
    """The CLI starts and stops its own podman service; bad data fails the assert-valid step in its container
    (a step without retries, so the run stops at once)."""
    data = tmp_path / "tables"
    data.mkdir()
    products = pd.DataFrame({"product_id": ["a", "b", "b"], "title": ["x", "y", " "]}).astype("string")
    products.to_parquet(data / "products.parquet")
    judgments = pd.DataFrame(
        {"query": ["q1"] * 3, "product_id": ["a", "b", "c"], "relevance": [1.0, 2.0, 9.0]}
    )
    judgments.astype({"query": "string", "product_id": "string"}).to_parquet(data / "judgments.parquet")
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if key != "DOCKER_HOST"}
    command = [str(Path(sys.executable).parent / "fusionrank"), "run", "--local", "--runner", "container"]
    command += ["--source", f"parquet:{data}", "--tiny", "--home", str(home)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert "Inner task failed: 'assert-valid'" in message
    assert "exited with code 1; its log ends:" in message
    assert "ValidationFailed" in message.split("its log ends:")[-1], "the task's own log is shown"
    assert not list((home / "runs").glob("*/register")), "nothing is registered"
