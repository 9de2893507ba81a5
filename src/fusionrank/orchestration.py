"""Compile the pipeline, run it locally under kfp.local, submit it to a cluster, schedule retraining."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusionrank import __version__
from fusionrank.errors import ConfigError, ServiceUnavailable
from fusionrank.revision import git_revision

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# The embedded default for `make run`: real Home Depot data, sampled so that the whole DAG, MiniLM
# fine-tuning included, finishes in minutes on a 2-core CPU (STACK-NOTES: ~25 training pairs/s there).
LOCAL_DEFAULTS: dict[str, object] = {
    "source": "homedepot",
    "max_queries": 1500,
    "max_users": 2000,
    "candidates_k": 50,
    "max_eval_requests": 100,
    "bert_max_train_samples": 150,
    "bert_batch_size": 32,
    "bert_max_length": 48,
    # few steps on a CPU sample: a higher rate than the full GPU run's (benchmarks/bert_quality.py)
    "bert_learning_rate": 3e-4,
    "bi_max_train_samples": 300,
    "bi_epochs": 1,
    "bi_learning_rate": 5e-5,
    # every candidate of the evaluation frames, and a random draw of the catalog up to this many
    "embed_max_products": 8000,
}
# A smoke run: small samples of the real data and a tiny random BERT, so the whole DAG takes a couple of
# minutes (the tests' runs, subprocess and container, and benchmarks/bench_container_run.py).
SMOKE_PARAMS: dict[str, object] = {
    "max_queries": 120,
    "max_users": 300,
    "candidates_k": 20,
    "max_eval_requests": 12,
    "seq_epochs": 2,
    "tiny_model": True,
    "bert_max_steps": 4,
    "bert_max_train_samples": 30,
    "bert_batch_size": 16,
    "bert_max_length": 32,
    "bi_max_train_samples": 30,
    "bi_max_length": 32,
    "embed_max_products": 600,
}
FULL_OVERRIDES: dict[str, object] = {
    "max_queries": 0,
    "max_users": 0,
    "candidates_k": 100,
    "max_eval_requests": 0,
    "bert_max_train_samples": 0,
    "bert_batch_size": 64,
    "bert_max_length": 64,
    "bert_learning_rate": 1e-4,
    "bert_epochs": 2,
    "bi_max_train_samples": 0,
    "bi_batch_size": 64,
    "embed_max_products": 0,
}
STEP_ORDER = (
    "ingest",
    "validate",
    "assert-valid",
    "split",
    "features",
    "candidates",
    "finetune-bert",
    "finetune-biencoder",
    "fit-fusion",
    "evaluate",
    "drift",
    "gate",
    "package",
    "register",
    "report-rejection",
)


# Parameters that take one of a few names, checked before a run starts rather than when its step reads them
# (the bi-encoder's loss is read after the cross-encoder has trained). `fusionrank.biencoder.DISTILL_LOSSES`
# is the source of these names; a test keeps the two equal, so parsing needs no torch import.
CHOICE_PARAMS: dict[str, tuple[str, ...]] = {"bi_distill_loss": ("margin_mse", "listwise")}


def parse_params(pairs: list[str]) -> dict[str, object]:
    """`key=value` strings as pipeline arguments; values are read as YAML (numbers, booleans, mappings)."""
    from pipelines.training import training_pipeline

    inputs = training_pipeline.component_spec.inputs or {}
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--param takes key=value, got {pair!r}")
        if key not in inputs:
            raise ConfigError(f"unknown pipeline parameter {key!r}; known: {', '.join(sorted(inputs))}")
        value = yaml.safe_load(raw) if raw else ""
        if inputs[key].type == "Float":
            # KFP refuses an int for a float (seq_max_seconds=900), and YAML 1.1 reads 1e-4 as a string
            try:
                if isinstance(value, bool):
                    raise ValueError(raw)
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"parameter {key!r} takes a number, got {raw!r}") from None
        if key in CHOICE_PARAMS and value not in CHOICE_PARAMS[key]:
            raise ConfigError(f"parameter {key!r} takes one of {', '.join(CHOICE_PARAMS[key])}, got {raw!r}")
        params[key] = value
    return params


def load_gate_config(path: Path | None) -> dict | None:
    """A gate config file (YAML or JSON), validated by the gate itself; None when no file is given."""
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{path}: gate config file not found")
    from fusionrank.gate import GateConfig

    data = yaml.safe_load(path.read_text()) or {}
    return GateConfig.from_dict(data).to_dict()


def compile_pipeline(output: Path) -> Path:
    """Write the training pipeline's KFP IR YAML to `output`."""
    from kfp import compiler

    from pipelines.training import training_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, str(output))
    return output


@dataclass
class LocalRun:
    """What a local run left behind: where, how long each step took, and the outcome."""

    root: Path
    run_dir: Path | None
    outcome: str | None
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def artifact(self, task: str, name: str) -> Path | None:
        """The path of output `name` of `task`, if the task ran."""
        if self.run_dir is None:
            return None
        path = self.run_dir / task / name
        return path if path.exists() else None

    def ran(self, task: str) -> bool:
        return self.run_dir is not None and (self.run_dir / task).is_dir()


def local_home(home: Path | None = None) -> Path:
    """The local state folder: registry, BentoML store, run artifacts."""
    return (home or Path(os.environ.get("FUSIONRANK_HOME", ".fusionrank"))).resolve()


RUNNERS = ("subprocess", "container")
# Written into each local run's folder: the arguments it ran with (`fusionrank check-image` reuses them).
ARGUMENTS_FILE = "pipeline-arguments.json"


def run_local(params: dict[str, object], home: Path | None = None, runner: str = "subprocess") -> LocalRun:
    """Run the whole DAG on this machine under kfp.local.

    `runner` "subprocess": every task in this environment (SubprocessRunner). "container": every task in its
    image through a Docker-compatible engine (DockerRunner against podman; see fusionrank.containers).
    The registry is an SQLite file and the BentoML store a folder, both under `home`; each run's artifacts
    land under `home/runs/`.
    """
    from kfp import local

    from fusionrank.registry import local_registry_uri
    from pipelines.training import PIPELINE_NAME, training_pipeline

    if runner not in RUNNERS:
        raise ConfigError(f"unknown runner {runner!r}; expected one of {', '.join(RUNNERS)}")
    home = local_home(home)
    root = home / "runs"
    root.mkdir(parents=True, exist_ok=True)
    # Subprocess tasks inherit these, and read nothing else from this process (containers get their own).
    os.environ["BENTOML_HOME"] = str(home / "bentoml")
    os.environ.setdefault("FUSIONRANK_GIT_REVISION", git_revision())
    arguments = {
        "registry_uri": local_registry_uri(home),
        "model_name": f"fusionrank-{params.get('source', 'homedepot')}",
    }
    arguments.update(params)
    with _kfp_runner(runner, home, arguments) as (kfp_runner, arguments, failed_task):
        local.init(runner=kfp_runner, pipeline_root=str(root), raise_on_error=True)
        before = set(root.glob(f"{PIPELINE_NAME}-*"))
        started = time.time()
        outcome, error = None, None
        try:
            with warnings.catch_warnings(), _steps_stop_with_run():
                # Expected locally: resources apply on a cluster only, and the subprocess tasks run in this
                # environment, which holds the same fusionrank package as the component image.
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
                warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
                task = training_pipeline(**arguments)
            outcome = task.output
        except RuntimeError as exc:
            error = ANSI.sub("", str(exc)) + failed_task()
        seconds = time.time() - started
    created = sorted(set(root.glob(f"{PIPELINE_NAME}-*")) - before)
    run_dir = created[-1] if created else None
    steps = _step_seconds(run_dir, started)
    if run_dir is not None:
        (run_dir / ARGUMENTS_FILE).write_text(json.dumps(arguments, indent=2, sort_keys=True))
    return LocalRun(root, run_dir, outcome, seconds, steps, error)


@contextlib.contextmanager
def _steps_stop_with_run(grace_seconds: float = 10.0):
    """A SIGTERM to the run stops the step it is running, then exits 128 + 15.

    kfp.local starts each task as a child process and waits for it; a SIGTERM sent to this process alone (a
    supervisor, a CI timeout, `kill`) would end it and leave the step running on, writing into the run
    folder. The step gets SIGTERM too, SIGKILL after `grace_seconds`. Only the main thread can set a handler;
    elsewhere the block runs without one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import psutil

    def stop(signum: int, _frame: object) -> None:
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=grace_seconds)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _kfp_runner(runner: str, home: Path, arguments: dict[str, object]):
    """(kfp runner, the arguments to run with, a function giving the failed task's details) for the block."""
    if runner == "subprocess":
        from kfp import local

        yield local.SubprocessRunner(use_venv=False), arguments, lambda: ""
        return
    from fusionrank.containers import container_run

    with container_run(home, arguments) as run:
        yield run.runner, run.arguments, run.record.describe


def latest_approved_run(home: Path) -> Path:
    """The newest run under `home/runs` that went through the approved branch (its package step ran)."""
    from pipelines.training import PIPELINE_NAME

    runs = sorted((home / "runs").glob(f"{PIPELINE_NAME}-*"), reverse=True)
    for run_dir in runs:
        if (run_dir / ARGUMENTS_FILE).is_file() and (run_dir / "register" / "executor_output.json").is_file():
            return run_dir
    raise ConfigError(
        f"no finished run under {home / 'runs'} took the approved branch: "
        "run `fusionrank run --local --tiny --force-gate approve` first (or pass --run)"
    )


def _step_seconds(run_dir: Path | None, started: float) -> dict[str, float]:
    """Each task's wall time, from when it finished (tasks run one after another).

    A task's end is when it wrote its executor output, the last thing it writes; without one (a failed
    task), its outputs' last change. Not the last change of any file under the task: a later step may
    write into an earlier step's artifact (the bi-encoder writes embeddings into the run's online store).
    """
    if run_dir is None:
        return {}
    finished = {}
    for task_dir in run_dir.iterdir():
        if not task_dir.is_dir():
            continue
        marker = task_dir / "executor_output.json"
        stamps = (
            [marker.stat().st_mtime] if marker.is_file() else [p.stat().st_mtime for p in task_dir.rglob("*")]
        )
        if stamps:
            finished[task_dir.name] = max(stamps)
    seconds, previous = {}, started
    for name, stamp in sorted(finished.items(), key=lambda item: item[1]):
        seconds[name] = max(0.0, stamp - previous)
        previous = stamp
    return seconds


RUN_SERVICE_ACCOUNT = "fusionrank-pipeline-runner"  # manifests/base/pipeline-runs.yaml
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"


def _client(host: str, namespace: str | None):
    import kfp

    credentials = None
    token = os.environ.get(TOKEN_PATH_ENV)
    if token and Path(token).is_file():
        # Multi-user Kubeflow: in the cluster, authenticate with the pod's projected service-account token.
        credentials = kfp.client.ServiceAccountTokenVolumeCredentials(path=token)
    try:
        return kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)
    except Exception as exc:  # the constructor's health check raises several connection errors
        raise ServiceUnavailable(f"Kubeflow Pipelines API at {host} is unreachable: {exc}") from exc


def submit(
    host: str, params: dict[str, object], experiment: str, namespace: str | None, run_name: str | None
) -> str:
    """Create a run of the compiled pipeline on a cluster; return its run id."""
    client = _client(host, namespace)
    package = compile_pipeline(Path("build") / "fusionrank-pipeline.yaml")
    params = cluster_params(params)
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments=params,
        run_name=run_name or f"fusionrank-{__version__}-{int(time.time())}",
        experiment_name=experiment,
        namespace=namespace,
        enable_caching=True,
        service_account=RUN_SERVICE_ACCOUNT,
    )
    return result.run_id


def cluster_params(params: dict[str, object], with_revision: bool = True) -> dict[str, object]:
    """A cluster run's arguments: the data volume's folder and (one-off runs) this checkout's revision,
    unless given."""
    from pipelines.training import CLUSTER_DATA_DIR

    defaults: dict[str, object] = {"data_dir": CLUSTER_DATA_DIR}
    if with_revision and "git_revision" in _inputs():
        defaults["git_revision"] = git_revision()
    return {**defaults, **params}


def _inputs() -> set[str]:
    from pipelines.training import training_pipeline

    return set(training_pipeline.component_spec.inputs or {})


def schedule(
    host: str,
    cron: str,
    params: dict[str, object],
    experiment: str,
    namespace: str | None,
    name: str,
) -> str:
    """Create or replace the recurring run `name` (one per pipeline, never duplicated); return its id.

    KFP has no update call: the upsert deletes every recurring run of that name in the experiment, then
    creates one, with at most one run at a time and no catch-up of missed runs.
    """
    if len(cron.split()) != 6:
        raise ConfigError(f"--cron takes six fields, seconds first (e.g. '0 0 3 * * *'), got {cron!r}")
    client = _client(host, namespace)
    package = compile_pipeline(Path("build") / "fusionrank-pipeline.yaml")
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    flt = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})
    existing = client.list_recurring_runs(experiment_id=experiment_id, filter=flt).recurring_runs or []
    for job in existing:
        client.delete_recurring_run(job.recurring_run_id)
    job = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=cluster_params(params, with_revision=False),
        pipeline_package_path=str(package),
        enable_caching=False,
        service_account=RUN_SERVICE_ACCOUNT,
    )
    return job.recurring_run_id


def describe_failure(run: LocalRun) -> str:
    """The reason a local run failed, including the validation summary when the data was bad."""
    lines = [run.error or "the pipeline failed"]
    result = run.artifact("validate", "result")
    if result is not None:
        outcome = json.loads(result.read_text())
        if not outcome.get("success", True):
            from fusionrank.validation import ValidationOutcome

            lines.append(ValidationOutcome.from_dict(outcome).summary())
            lines.append(f"validation report: {run.artifact('validate', 'report')}")
    return "\n".join(lines)
