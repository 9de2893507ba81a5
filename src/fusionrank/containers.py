"""The pipeline's components in their container image on this machine: the DAG under kfp.local's DockerRunner,
and a fidelity check of the image against the compiled pipeline.

What a cluster would run is the image plus each executor's command from the compiled YAML; both are exercised
here, before a cluster sees them, so that a dependency missing from the image, a wrong entrypoint, a path only
root may write, or a component that imports from the checkout fails on this machine instead.

- `engine()`: a Docker-compatible API. `$DOCKER_HOST` when it is set; otherwise a `podman system service` is
  started on a socket in a temporary folder (with deploy/podman/containers.conf) and stopped afterwards.
- `container_run(home, arguments)`: kfp.local's DockerRunner set up for a fusionrank run (mounts, user,
  environment, the image check), around the one podman workaround (`run_container`).
- `check_image(run_dir, out_dir)`: the fidelity check (see its docstring).

Local image mapping: only the CPU image can be built on a machine without a GPU, so local container runs
(the DAG and the check) run the fine-tuning step, whose executor names GPU_IMAGE, in CPU_IMAGE: the same
code and dependencies, with torch's CPU build. The compiled pipeline keeps naming GPU_IMAGE; nothing is tagged
under the GPU image's name here.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fusionrank.errors import ConfigError, ServiceUnavailable
from fusionrank.revision import CODE_ROOT

PODMAN_CONF = CODE_ROOT / "deploy" / "podman" / "containers.conf"
# The Dockerfile's USER: containers run as this uid, never as root.
IMAGE_UID = 10001
IMAGE_GID = 10001
SERVICE_START_SECONDS = 60
LOG_TAIL_LINES = 40
INSTALL_HINT = "run `make podman-tools` (apt-get install podman runc debootstrap)"
BUILD_HINT = "run `make image`"


def local_image(image: str) -> str:
    """The image a local container run uses for `image`: the CPU image in place of the GPU one (see above)."""
    from components.images import CPU_IMAGE, GPU_IMAGE

    return CPU_IMAGE if image == GPU_IMAGE else image


# ---------------------------------------------------------------------------------------------------------
# The container engine


def podman_binary() -> str:
    """The podman on PATH, or ServiceUnavailable naming the install command."""
    binary = shutil.which("podman")
    if binary is None:
        raise ServiceUnavailable(
            "podman is not installed (no `podman` on PATH), and $DOCKER_HOST names no other engine: "
            f"{INSTALL_HINT}"
        )
    return binary


def podman_env() -> dict[str, str]:
    """The environment for podman commands: this project's containers.conf (why: see that file)."""
    return {**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)}


def client_for(url: str):
    """A Docker SDK client for the engine at `url`, checked with a ping."""
    import docker

    try:
        client = docker.DockerClient(base_url=url, timeout=600)
        client.ping()
    except Exception as exc:  # the SDK raises DockerException, requests' and urllib3's errors
        raise ServiceUnavailable(
            f"the container engine at {url} does not answer ({type(exc).__name__}: {exc}). Start it with "
            f"`CONTAINERS_CONF={PODMAN_CONF} podman system service --time=0 {url} &`, or unset DOCKER_HOST "
            "to let fusionrank start one"
        ) from None
    return client


@contextlib.contextmanager
def podman_service() -> Iterator[str]:
    """`podman system service` on a unix socket in a temporary folder; yields its URL, stops it on exit."""
    binary = podman_binary()
    folder = Path(tempfile.mkdtemp(prefix="fusionrank-podman-"))
    url = f"unix://{folder / 'podman.sock'}"
    log = folder / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, "system", "service", "--time=0", url],
            env=podman_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_service(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_service(process: subprocess.Popen, url: str, log: Path) -> None:
    import docker

    deadline = time.monotonic() + SERVICE_START_SECONDS
    while True:
        if process.poll() is not None:
            raise ServiceUnavailable(
                f"`podman system service {url}` exited with code {process.returncode}:\n"
                f"{log.read_text(errors='replace').strip()[-2000:]}\n{INSTALL_HINT}, then try again"
            )
        socket = Path(url.removeprefix("unix://"))
        if socket.exists():
            with contextlib.suppress(Exception):
                docker.DockerClient(base_url=url, timeout=10).ping()
                return
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"`podman system service {url}` did not answer in {SERVICE_START_SECONDS} s"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def engine() -> Iterator[str]:
    """A reachable Docker-compatible API: $DOCKER_HOST if set, else a podman service started for the block."""
    url = os.environ.get("DOCKER_HOST")
    if url:
        client_for(url).close()
        yield url
        return
    with podman_service() as url:
        yield url


def require_images(client, images: set[str], url: str) -> None:
    """ConfigError naming `make image` when the engine lacks one of `images` (nothing is pulled)."""
    present = {tag for image in client.images.list() for tag in image.tags}
    missing = sorted(image for image in images if image not in present)
    if missing:
        raise ConfigError(
            f"image {', '.join(missing)} is not built (the engine at {url} has no such image; this "
            f"checkout's images are tagged with its version and git commit): {BUILD_HINT}"
        )


# ---------------------------------------------------------------------------------------------------------
# Running one container: the podman workaround


@dataclass
class TaskRecord:
    """What the last container left: its image, exit code and the tail of its log (for error messages)."""

    image: str = ""
    exit_code: int | None = None
    log_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))

    def describe(self) -> str:
        if self.exit_code is None:
            return ""
        tail = "".join(self.log_tail).rstrip()
        return (
            f"\nthe task's container ({self.image}) exited with code {self.exit_code}; its log ends:\n{tail}"
        )


def run_container(
    client,
    image: str,
    command: list[str],
    volumes: dict,
    *,
    record: TaskRecord,
    echo: bool = True,
    **run_args,
) -> int:
    """Run one task's container to its end and return its exit code (kfp's `run_docker_container`, fixed).

    kfp 2.17 starts task containers with `auto_remove=True`, then streams the logs and calls `wait()`. With
    podman 4.3 the container can be gone by then, and podman answers the Docker SDK's inspect with a 500,
    not the 404 that kfp catches: the run fails at random on fast tasks. kfp also reads a container that
    vanished before `wait()` as exit code 0, which would hide a failed task. Here the container is kept until
    `wait()` has returned its exit code, then removed. Images are never pulled (there is no registry here).
    The log is printed as it comes (`echo`), and its last lines are kept in `record`.
    """
    image = local_image(image)
    record.image, record.exit_code = image, None
    record.log_tail.clear()
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True, **run_args
    )
    try:
        pending = ""
        for chunk in container.logs(stream=True, follow=True):
            text = chunk.decode(errors="replace")
            if echo:
                print(text, end="")
            pending += text
            *lines, pending = pending.split("\n")
            record.log_tail.extend(f"{line}\n" for line in lines)
        if pending:
            record.log_tail.append(pending)
        record.exit_code = int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
    return record.exit_code


@contextlib.contextmanager
def kfp_uses(record: TaskRecord) -> Iterator[None]:
    """For the block, kfp.local's DockerRunner starts containers through `run_container`."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container

    def patched(client, image, command, volumes, **run_args):
        return run_container(client, image, command, volumes, record=record, **run_args)

    docker_task_handler.run_docker_container = patched
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


@contextlib.contextmanager
def docker_host(url: str) -> Iterator[None]:
    """kfp's task handler connects with `docker.from_env()`: point it at `url` for the block."""
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous


# ---------------------------------------------------------------------------------------------------------
# Host folders inside the containers


def grant_to_image_user(folder: Path) -> None:
    """Make `folder` (fusionrank's own state: registry, BentoML store, runs) writable for the image's user.

    The tasks run as uid 10001, as in the cluster's pods, and write the run's artifacts, the SQLite registry
    and the BentoML store through bind mounts at the same paths. With rootful podman, file ownership crosses
    the mount unchanged, so the folder is handed to that uid (recursively: files a host process wrote since
    are included). The host's root keeps full access; the user's other files are not touched. A non-root
    caller cannot hand files over: it gets the command that does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for path in [folder, *folder.rglob("*")]:
            os.lchown(path, IMAGE_UID, IMAGE_GID)
        return
    if folder.stat().st_uid != IMAGE_UID:
        raise ConfigError(
            f"{folder} must be writable by the image's user (uid {IMAGE_UID}): "
            f"run `sudo chown -R {IMAGE_UID}:{IMAGE_GID} {folder}`"
        )


def _bind(path: Path, read_only: bool):
    """`path` inside the container at the same path as here; a symbolic link (a `../shared` that links
    elsewhere) is mounted from what it points to, so the task finds the path the arguments name."""
    from docker.types import Mount

    return Mount(target=str(path), source=str(path.resolve()), type="bind", read_only=read_only)


def input_paths(arguments: dict[str, object]) -> list[Path]:
    """The host paths a run reads besides its state: the data folder, a parquet source, a base model."""
    paths = []
    if arguments.get("data_dir"):
        paths.append(Path(str(arguments["data_dir"])))
    source = str(arguments.get("source", ""))
    if source.startswith("parquet:"):
        paths.append(Path(source.removeprefix("parquet:")))
    if arguments.get("base_model"):
        paths.append(Path(str(arguments["base_model"])))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not found (a container run mounts each path it reads)")
    # the arguments name these paths: they are mounted there (a link's target as its source, see _bind)
    return [p.absolute() for p in paths]


def with_host_paths(arguments: dict[str, object]) -> dict[str, object]:
    """The arguments with the data folder resolved on the host (`../shared/data` means nothing inside)."""
    from fusionrank.data.sources import default_data_dir

    resolved = dict(arguments)
    if not str(resolved.get("source", "")).startswith("parquet:") and not resolved.get("data_dir"):
        resolved["data_dir"] = str(default_data_dir().resolve())
    return resolved


def task_environment(state: Path) -> dict[str, str]:
    """What the tasks need beyond the image's own environment: the BentoML store, and a numba cache.

    ranx compiles its metrics with numba and caches them next to its code, which the image's user cannot
    write: without a cache folder of its own every container would compile them again (about 50 s on this
    2-core machine, in fit-fusion and again in evaluate). The cache lives in the state folder, so later tasks
    and runs reuse it, as the subprocess runner's venv does.
    """
    return {"BENTOML_HOME": str(state / "bentoml"), "NUMBA_CACHE_DIR": str(state / "cache" / "numba")}


@dataclass
class ContainerRun:
    """What `container_run` sets up: the kfp runner, the arguments to run with, the failing task's record."""

    runner: object
    arguments: dict[str, object]
    record: TaskRecord


@contextlib.contextmanager
def container_run(home: Path, arguments: dict[str, object]) -> Iterator[ContainerRun]:
    """kfp.local's DockerRunner for a run whose state lives in `home`, ready for the block.

    Before anything runs: the engine answers and holds the image (else a clear error). Mounted at the same
    paths as on the host: `home` read-write (artifacts, SQLite registry, BentoML store), every input path
    read-only. The tasks get `task_environment`; the image sets the rest (offline, quiet, its git revision).
    """
    from kfp import local

    from components.images import CPU_IMAGE

    arguments = with_host_paths(arguments)
    mounts = [_bind(home, read_only=False)] + [_bind(p, read_only=True) for p in input_paths(arguments)]
    with engine() as url:
        client = client_for(url)
        try:
            require_images(client, {CPU_IMAGE}, url)
        finally:
            client.close()
        grant_to_image_user(home)
        record = TaskRecord()
        runner = local.DockerRunner(mounts=mounts, environment=task_environment(home))
        with docker_host(url), kfp_uses(record):
            yield ContainerRun(runner, arguments, record)


# ---------------------------------------------------------------------------------------------------------
# The fidelity check


@dataclass
class ExecutorCheck:
    """One executor of the compiled pipeline, run in the image."""

    executor: str
    task: str
    image: str
    exit_code: int
    seconds: float
    outputs: list[str]
    missing: list[str]
    log_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.missing


def check_image(run_dir: Path, out_dir: Path, pipeline_yaml: Path | None = None) -> list[ExecutorCheck]:
    """Run every executor of the compiled pipeline, exactly as the YAML states it, in its (local) image.

    For each executor (`deploymentSpec.executors`), one task that uses it is taken from the compiled DAG, the
    branch that a run did not take included. Its inputs are real: the parameters the finished local run
    `run_dir` was given (`pipeline-arguments.json`, which `run_local` writes), and its upstream tasks' outputs
    in that run's folder, so `run_dir` must be a run that went through the approved branch. kfp.local's own
    functions build the executor input and fill the `{{$}}` placeholders of the YAML's `command` + `args`;
    the container runs that command as the image's user, with the run's folder read-only (a task may not
    write its inputs) and outputs, registry and BentoML store under `out_dir`. A task passes when it exits 0
    and wrote every output it declares: each artifact's file or folder (metadata for Metrics, which write
    none) and each output parameter.
    """
    from components.images import CPU_IMAGE
    from fusionrank.orchestration import ARGUMENTS_FILE, compile_pipeline

    run_dir = run_dir.resolve()
    out_dir = out_dir.resolve()
    arguments_file = run_dir / ARGUMENTS_FILE
    if not arguments_file.is_file():
        raise ConfigError(
            f"{run_dir}: not a finished local run ({ARGUMENTS_FILE} missing): "
            "run `fusionrank run --local` first"
        )
    pipeline_yaml = pipeline_yaml or compile_pipeline(out_dir / "pipeline.yaml")
    spec = _pipeline_spec(pipeline_yaml)
    arguments = {**_pipeline_defaults(spec), **json.loads(arguments_file.read_text())}
    # Side effects land in out_dir: a registry of its own (register writes a version; evaluate and drift read
    # the champion), and the BentoML store through BENTOML_HOME below.
    arguments["registry_uri"] = f"sqlite:///{out_dir / 'mlflow.db'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    resolver = _Resolver(spec, run_dir, arguments)
    mounts = [_bind(run_dir, read_only=True), _bind(out_dir, read_only=False)]
    mounts += [_bind(p, read_only=True) for p in input_paths(arguments)]
    mounts += _online_store_copy(run_dir, out_dir)
    results = []
    with engine() as url:
        client = client_for(url)
        try:
            require_images(client, {CPU_IMAGE}, url)
            grant_to_image_user(out_dir)
            for executor, (dag, task_name) in resolver.executor_tasks().items():
                results.append(_check_executor(client, resolver, executor, dag, task_name, out_dir, mounts))
        finally:
            client.close()
    return results


def _online_store_copy(run_dir: Path, out_dir: Path) -> list:
    """A writable copy of the run's local feature store data, mounted where the run's store names it.

    The online store is a service's state, not an artifact: the bi-encoder step writes the product
    embeddings into it (Redis on a cluster). A local run keeps it, SQLite, inside the features step's
    artifact, which the check mounts read-only; each check writes to its own copy instead, so the run's
    store stays as the run left it.
    """
    import shutil

    from docker.types import Mount

    data = run_dir / "features" / "feature_store" / "feature_repo" / "data"
    if not data.is_dir():
        return []
    copy = out_dir / "feature-store-data"
    shutil.copytree(data, copy, dirs_exist_ok=True)
    return [Mount(target=str(data), source=str(copy), type="bind", read_only=False)]


def _check_executor(client, resolver, executor, dag, task_name, out_dir, mounts) -> ExecutorCheck:
    from google.protobuf import json_format
    from kfp.local import executor_input_utils, placeholder_utils

    spec = resolver.spec
    task = resolver.dags[dag].tasks[task_name]
    component_name = task.component_ref.name
    component = spec.components[component_name]
    container = json_format.MessageToDict(spec.deployment_spec)["executors"][executor]["container"]
    task_dir_name = component_name.removeprefix("comp-")
    pipeline_resource = f"image-check-{uuid.uuid4().hex[:8]}"
    task_root = out_dir / pipeline_resource / task_dir_name
    executor_input = executor_input_utils.construct_executor_input(
        component_spec=component,
        arguments=resolver.task_arguments(dag, task_name),
        task_root=str(task_root),
        block_input_artifact=False,
    )
    command = placeholder_utils.replace_placeholders(
        full_command=[*container.get("command", []), *container.get("args", [])],
        executor_input_dict=executor_input_utils.executor_input_to_dict(executor_input, component),
        pipeline_resource_name=pipeline_resource,
        task_resource_name=task_dir_name,
        pipeline_root=str(out_dir),
        unique_pipeline_id=uuid.uuid4().hex,
    )
    record = TaskRecord()
    started = time.monotonic()
    exit_code = run_container(
        client,
        container["image"],
        command,
        {},
        record=record,
        echo=False,
        mounts=mounts,
        environment=task_environment(out_dir),
    )
    seconds = time.monotonic() - started
    outputs, missing = [], []
    written = _read_executor_output(task_root)
    for name, artifact in json_format.MessageToDict(executor_input)["outputs"].get("artifacts", {}).items():
        path = task_root / name
        is_metrics = artifact["artifacts"][0]["type"]["schemaTitle"] == "system.Metrics"
        present = name in written.get("artifacts", {}) if is_metrics else path.exists()
        (outputs if present else missing).append(name)
    for name in component.output_definitions.parameters:
        present = name in written.get("parameterValues", {}) or (task_root / name).exists()
        (outputs if present else missing).append(name)
    return ExecutorCheck(
        executor=executor,
        task=task_name,
        image=local_image(container["image"]),
        exit_code=exit_code,
        seconds=seconds,
        outputs=sorted(outputs),
        missing=sorted(missing),
        log_tail="".join(record.log_tail) if exit_code else "",
    )


def _read_executor_output(task_root: Path) -> dict:
    path = task_root / "executor_output.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _pipeline_spec(path: Path):
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    document = next(yaml.safe_load_all(Path(path).read_text()))
    return json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec())


def _pipeline_defaults(spec) -> dict[str, object]:
    from google.protobuf import json_format

    return {
        name: json_format.MessageToDict(parameter.default_value)
        for name, parameter in spec.root.input_definitions.parameters.items()
        if parameter.HasField("default_value")
    }


class _Resolver:
    """A compiled task's inputs, resolved against a finished local run (its folder and its arguments)."""

    def __init__(self, spec, run_dir: Path, arguments: dict[str, object]) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.arguments = arguments
        # Every DAG: the root and each condition component; where each condition component is used.
        self.dags = {"root": spec.root.dag}
        self.dags.update({name: c.dag for name, c in spec.components.items() if c.HasField("dag")})
        self.parent: dict[str, tuple[str, str]] = {}
        for dag_name, dag in self.dags.items():
            for task_name, task in dag.tasks.items():
                if task.component_ref.name in self.dags:
                    self.parent[task.component_ref.name] = (dag_name, task_name)

    def executor_tasks(self) -> dict[str, tuple[str, str]]:
        """executor label -> (dag, task) of the first task that runs it."""
        found: dict[str, tuple[str, str]] = {}
        for dag_name, dag in self.dags.items():
            for task_name, task in dag.tasks.items():
                component = self.spec.components[task.component_ref.name]
                if component.executor_label and component.executor_label not in found:
                    found[component.executor_label] = (dag_name, task_name)
        return dict(sorted(found.items()))

    def _task_dir(self, dag: str, task_name: str) -> Path:
        return self.run_dir / self.dags[dag].tasks[task_name].component_ref.name.removeprefix("comp-")

    def _producer(self, dag: str, task_name: str) -> tuple[Path, dict]:
        folder = self._task_dir(dag, task_name)
        if not folder.is_dir():
            raise ConfigError(
                f"{self.run_dir}: task {task_name!r} did not run, so its outputs cannot feed the check: "
                "use a run that went through the approved branch (e.g. `--force-gate approve`)"
            )
        return folder, _read_executor_output(folder)

    def task_arguments(self, dag: str, task_name: str) -> dict[str, object]:
        task = self.dags[dag].tasks[task_name]
        values: dict[str, object] = {}
        for name, spec in task.inputs.parameters.items():
            values[name] = self._parameter(dag, spec)
        for name, spec in task.inputs.artifacts.items():
            values[name] = self._artifact(dag, spec)
        return values

    def _parameter(self, dag: str, spec) -> object:
        from google.protobuf import json_format

        kind = spec.WhichOneof("kind")
        if kind == "runtime_value":
            return json_format.MessageToDict(spec.runtime_value.constant)
        if kind == "component_input_parameter":
            name = spec.component_input_parameter
            if dag == "root":
                return self.arguments[name]
            parent_dag, condition_task = self.parent[dag]
            return self._parameter(
                parent_dag, self.dags[parent_dag].tasks[condition_task].inputs.parameters[name]
            )
        if kind == "task_output_parameter":
            producer = spec.task_output_parameter
            _, written = self._producer(dag, producer.producer_task)
            return written["parameterValues"][producer.output_parameter_key]
        raise ConfigError(f"the image check cannot resolve a {kind} input")

    def _artifact(self, dag: str, spec):
        from kfp.local import executor_output_utils
        from kfp.pipeline_spec import pipeline_spec_pb2

        kind = spec.WhichOneof("kind")
        if kind == "component_input_artifact":
            parent_dag, condition_task = self.parent[dag]
            parent_spec = (
                self.dags[parent_dag].tasks[condition_task].inputs.artifacts[spec.component_input_artifact]
            )
            return self._artifact(parent_dag, parent_spec)
        if kind != "task_output_artifact":
            raise ConfigError(f"the image check cannot resolve a {kind} input")
        producer = spec.task_output_artifact
        folder, written = self._producer(dag, producer.producer_task)
        key = producer.output_artifact_key
        component = self.spec.components[self.dags[dag].tasks[producer.producer_task].component_ref.name]
        artifact_type = component.output_definitions.artifacts[key].artifact_type
        metadata = {}
        listed = written.get("artifacts", {}).get(key, {}).get("artifacts", [])
        if listed:
            metadata = listed[0].get("metadata", {})
        runtime = pipeline_spec_pb2.RuntimeArtifact(name=key, type=artifact_type, uri=str(folder / key))
        runtime.metadata.update(metadata)
        return executor_output_utils.runtime_artifact_to_dsl_artifact(runtime)


def check_failures(results: list[ExecutorCheck]) -> str:
    """One paragraph per failed executor: what failed, its exit code and the end of its log."""
    lines = []
    for result in results:
        if result.passed:
            continue
        what = f"exit code {result.exit_code}" if result.exit_code else f"missing outputs {result.missing}"
        lines.append(f"{result.executor} (task {result.task}, {result.image}): {what}\n{result.log_tail}")
    return "\n".join(lines)
