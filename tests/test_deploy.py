"""Deployment, checked offline: the Dockerfile and its image names, and every Kustomize overlay as rendered.

Each overlay is rendered with `kubectl kustomize` and every object is validated against the Kubernetes 1.32
schemas (kubernetes-validate, strict). On top of the schemas: probes, resources and the security context of
every container, that no Secret value is written anywhere, that the images are pinned and are the ones the
pipeline names, and that the pieces fit together: the ranker's command is a valid `bentoml serve` of
serving/service.py, its Feast settings load in Feast, MLflow accepts the URIs its clients use, and the
schedule Job, run through the real CLI against a recording KFP client, upserts one recurring run with
max_concurrency=1 and no catch-up.

kubectl: the one on PATH (or $KUBECTL); where there is none, the test setup downloads kubectl v1.32 from
dl.k8s.io, checks its SHA-256, and keeps it under ~/.cache/fusionrank/; it skips, saying so, only when that
download is impossible.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar
from urllib.parse import urlsplit

import pytest
import yaml

from components.images import CPU_IMAGE, CPU_REPOSITORY, GPU_IMAGE, REGISTRY
from fusionrank import __version__

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
DOCKERFILE = REPO / "Dockerfile"
IMAGES_MK = REPO / "deploy" / "images.mk"
DEPLOY_README = REPO / "README.md"  # its "Deploy to a cluster" section
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
RENDERABLE = ["base", *OVERLAYS]
KUBERNETES_VERSION = "1.32.0"
KUBECTL_VERSION = "v1.32.4"
# Where the Dockerfile puts the code (its WORKDIR in the build stages).
APP_ROOT = "/opt/fusionrank"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# An env var whose name says it holds a credential must come from a Secret.
SECRET_ENV_NAME = re.compile(r"(PASSWORD|SECRET|API_KEY|ACCESS_KEY|_AUTH|BACKEND_STORE_URI)$")
# A credential written as text: a password option, or user:password@ in a URI (a $(VAR) reference is not).
INLINE_CREDENTIAL = re.compile(r"password=(?!\$\()[^,\s]+|://[^/\s:@]+:(?!\$\()[^/\s@]+@", re.IGNORECASE)
VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SECRET_PLACEHOLDER = "secret-from-{name}-{key}"


# ---------------------------------------------------------------------------------------------------------
# kubectl and rendering


def _download_kubectl() -> Path:
    """kubectl KUBECTL_VERSION from dl.k8s.io, checked against its published SHA-256, cached per user."""
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    if sys.platform != "linux" or arch is None:
        pytest.skip(
            f"kubectl is not installed, and there is no download for {sys.platform}/{platform.machine()}"
        )
    target = Path.home() / ".cache" / "fusionrank" / f"kubectl-{KUBECTL_VERSION}" / "kubectl"
    if target.is_file():
        return target
    url = f"https://dl.k8s.io/release/{KUBECTL_VERSION}/bin/linux/{arch}/kubectl"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            binary = response.read()
        with urllib.request.urlopen(f"{url}.sha256", timeout=30) as response:
            expected = response.read().decode().split()[0]
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        pytest.skip(
            f"kubectl is not on PATH and could not be downloaded from {url} ({exc}); install kubectl "
            f"{KUBECTL_VERSION} (https://kubernetes.io/docs/tasks/tools/) or set KUBECTL=/path/to/kubectl"
        )
    assert hashlib.sha256(binary).hexdigest() == expected, f"{url}: SHA-256 does not match {url}.sha256"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


@pytest.fixture(scope="module")
def kubectl() -> str:
    return os.environ.get("KUBECTL") or shutil.which("kubectl") or str(_download_kubectl())


@pytest.fixture(scope="module")
def render(kubectl: str):
    """`kubectl kustomize` of base or an overlay, parsed into objects (each rendered once per module)."""
    cache: dict[str, list[dict]] = {}

    def rendered(name: str) -> list[dict]:
        if name not in cache:
            folder = MANIFESTS / name if name == "base" else MANIFESTS / "overlays" / name
            result = subprocess.run(
                [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
            cache[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[name]

    return rendered


# ---------------------------------------------------------------------------------------------------------
# Reading rendered objects


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """Every object that runs pods, with its pod spec."""
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]


def all_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def container(docs: list[dict], kind: str, name: str, container_name: str) -> dict:
    pod = one(docs, kind, name)["spec"]["template"]["spec"]
    found = [c for c in all_containers(pod) if c["name"] == container_name]
    assert found, f"{kind} {name} has no container {container_name}"
    return found[0]


def config_value(docs: list[dict], ref: dict) -> str:
    """The value a configMapKeyRef names, from the rendered ConfigMaps (generated names included)."""
    config_map = one(docs, "ConfigMap", ref["name"])
    assert ref["key"] in config_map["data"], f"ConfigMap {ref['name']} has no key {ref['key']}"
    return config_map["data"][ref["key"]]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others stay as written."""
    return VAR_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def resolved_env(docs: list[dict], owner: dict, spec: dict) -> dict[str, str]:
    """A container's environment as the kubelet builds it; a secret becomes a recognisable placeholder."""
    env: dict[str, str] = {}
    for var in spec.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = expand(var.get("value", ""), env)
        elif "configMapKeyRef" in source:
            env[var["name"]] = config_value(docs, source["configMapKeyRef"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = SECRET_PLACEHOLDER.format(name=ref["name"], key=ref["key"])
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = owner["metadata"]["namespace"]
        else:
            pytest.fail(f"{var['name']}: an env source this test does not resolve: {source}")
    return env


def service_behind(url: str, docs: list[dict], namespace: str) -> dict:
    """The rendered Service that an in-cluster URL (name[.namespace[.svc...]]:port) reaches."""
    parts = urlsplit(url)
    labels = (parts.hostname or "").split(".")
    target_namespace = labels[1] if len(labels) > 1 else namespace
    assert target_namespace == namespace, f"{url} points at namespace {target_namespace}, not {namespace}"
    assert len(labels) <= 2 or labels[2:] == ["svc", "cluster", "local"][: len(labels) - 2], url
    service = one(docs, "Service", labels[0])
    ports = [p["port"] for p in service["spec"]["ports"]]
    assert (parts.port or 80) in ports, f"{url}: Service {labels[0]} listens on {ports}"
    return service


def image_path(path: str) -> Path:
    """Where a path of the image comes from in this checkout (the Dockerfile copies the tree to APP_ROOT)."""
    assert path.startswith(f"{APP_ROOT}/"), f"{path} is not under the image's code root {APP_ROOT}"
    copied = image_sources()
    relative = path.removeprefix(f"{APP_ROOT}/")
    for destination, source in copied.items():
        if relative == destination or relative.startswith(f"{destination}/"):
            return REPO / source / relative.removeprefix(destination).lstrip("/")
    # A folder whose files are copied one by one, each to the same place as in the checkout.
    inside = {d: s for d, s in copied.items() if d.startswith(f"{relative}/")}
    if inside and all(d == s for d, s in inside.items()):
        return REPO / relative
    pytest.fail(f"{path}: the Dockerfile copies nothing there (it copies {sorted(copied)})")


# ---------------------------------------------------------------------------------------------------------
# Reading the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions; the global ARGs before the first FROM under the key ''."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = match.group(2)
            stages[current] = [("FROM", match.group(1))]
        else:
            stages[current].append((keyword, rest))
    return stages


def image_sources() -> dict[str, str]:
    """Destination (relative to APP_ROOT) -> checkout path, for every COPY from the build context."""
    copied: dict[str, str] = {}
    for instructions in dockerfile_stages().values():
        workdir = "/"
        for keyword, rest in instructions:
            if keyword == "WORKDIR":
                workdir = rest
            if keyword != "COPY" or rest.startswith("--from"):
                continue
            *sources, destination = rest.split()
            base = Path(workdir) / destination
            for source in sources:
                target = base / Path(source).name if len(sources) > 1 or destination.endswith("/") else base
                if target.is_relative_to(APP_ROOT):
                    copied[str(target.relative_to(APP_ROOT))] = source
    return copied


# ---------------------------------------------------------------------------------------------------------
# Every overlay: schemas, resources, security, probes, wiring


@pytest.mark.parametrize("name", RENDERABLE)
def test_every_object_matches_the_kubernetes_schema(render, name: str) -> None:
    import kubernetes_validate

    docs = render(name)
    failures = []
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{label}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            # A custom resource would need checks of its own here: there is none in these manifests.
            failures.append(f"{label}: {exc.message}")
    assert not failures, "\n".join(failures)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    for expected in [
        ("Deployment", "fusionrank-ranker"),
        ("Service", "fusionrank-ranker"),
        ("HorizontalPodAutoscaler", "fusionrank-ranker"),
        ("PodDisruptionBudget", "fusionrank-ranker"),
        ("StatefulSet", "fusionrank-redis"),
        ("Service", "fusionrank-redis"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("ServiceAccount", "fusionrank-pipeline-runner"),
        ("Role", "fusionrank-pipeline-runner"),
        ("RoleBinding", "fusionrank-pipeline-runner"),
        ("Job", "fusionrank-schedule"),
    ]:
        assert expected in kinds, f"{name}: {expected} is missing"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_requests_and_limits_cpu_and_memory(render, name: str) -> None:
    from kubernetes.utils import parse_quantity

    for owner, pod in workloads(render(name)):
        for spec in all_containers(pod):
            label = f"{owner['kind']}/{owner['metadata']['name']}/{spec['name']}"
            resources = spec.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request, f"{label}: no {resource} request"
                assert limit, f"{label}: no {resource} limit"
                assert parse_quantity(request) <= parse_quantity(limit), (
                    f"{label}: {resource} request > limit"
                )


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_runs_as_non_root_with_a_read_only_root_filesystem(render, name: str) -> None:
    for owner, pod in workloads(render(name)):
        pod_context = pod.get("securityContext", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for spec in all_containers(pod):
            label = f"{owner['kind']}/{owner['metadata']['name']}/{spec['name']}"
            context = {**pod_context, **spec.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{label}: runAsNonRoot is not set"
            assert context.get("runAsUser", 0) != 0, f"{label}: runs as uid 0"
            assert context.get("allowPrivilegeEscalation") is False, f"{label}: privilege escalation allowed"
            assert context.get("readOnlyRootFilesystem") is True, f"{label}: root filesystem is writable"
            assert not context.get("privileged"), f"{label}: privileged"
            assert "ALL" in context.get("capabilities", {}).get("drop", []), f"{label}: capabilities kept"
            # With a read-only root, every place the container writes must be a writable volume.
            writable = [
                m["mountPath"]
                for m in spec.get("volumeMounts", [])
                if not m.get("readOnly")
                and (
                    "emptyDir" in volumes.get(m["name"], {})
                    or "persistentVolumeClaim" in volumes.get(m["name"], {})
                )
            ]
            claims = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
            writable += [m["mountPath"] for m in spec.get("volumeMounts", []) if m["name"] in claims]
            assert "/tmp" in writable, f"{label}: /tmp is not a writable volume"
            env = {v["name"]: v.get("value", "") for v in spec.get("env", [])}
            for var in ("HOME", "BENTOML_HOME", "HF_HOME", "NUMBA_CACHE_DIR", "MPLCONFIGDIR"):
                if var in env:
                    path = env[var]
                    assert any(path == w or path.startswith(f"{w}/") for w in writable), (
                        f"{label}: {var}={path} is not on a writable volume ({writable})"
                    )
        assert not any("hostPath" in v for v in volumes.values()), f"{owner['metadata']['name']}: hostPath"


@pytest.mark.parametrize("name", OVERLAYS)
def test_long_running_containers_have_readiness_and_liveness_probes(render, name: str) -> None:
    from mlflow.server.security_utils import HEALTH_ENDPOINTS

    docs = render(name)
    for owner, pod in workloads(docs):
        if owner["kind"] not in LONG_RUNNING_KINDS:
            continue
        for spec in pod["containers"]:
            label = f"{owner['kind']}/{owner['metadata']['name']}/{spec['name']}"
            ports = {p.get("name") for p in spec.get("ports", [])} | {
                p["containerPort"] for p in spec["ports"]
            }
            for probe_name in ("readinessProbe", "livenessProbe"):
                probe = spec.get(probe_name)
                assert probe, f"{label}: no {probe_name}"
                for action in ("httpGet", "tcpSocket"):
                    if action in probe:
                        assert probe[action]["port"] in ports, f"{label}: {probe_name} probes an unknown port"
    ranker = container(docs, "Deployment", "fusionrank-ranker", "ranker")
    # BentoML's own endpoints: ready once the service is loaded, alive while its process answers.
    assert ranker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ranker["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert ranker["startupProbe"]["httpGet"]["path"] == "/livez"
    mlflow = container(docs, "Deployment", "mlflow", "mlflow")
    # MLflow's health route, which its Host-header check lets through (kubelet probes come by pod IP).
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe_name]["httpGet"]["path"] in HEALTH_ENDPOINTS


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_autoscaler_and_disruption_budget_select_the_ranker(render, name: str) -> None:
    docs = render(name)
    deployment = one(docs, "Deployment", "fusionrank-ranker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    # The autoscaler owns the replica count: a replicas field would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    for service in objects(docs, "Service"):
        selected = [
            (owner, pod)
            for owner, pod in workloads(docs)
            if service["spec"]["selector"].items() <= owner["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for _, pod in selected:
            ports = {p.get("name") for c in pod["containers"] for p in c.get("ports", [])}
            ports |= {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, f"Service {service['metadata']['name']}: {port}"
    autoscaler = one(docs, "HorizontalPodAutoscaler", "fusionrank-ranker")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "fusionrank-ranker")
    assert 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    budget = one(docs, "PodDisruptionBudget", "fusionrank-ranker")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # maxUnavailable leaves drains possible even at the autoscaler's minimum.
    assert (
        budget["spec"].get("maxUnavailable", 0) >= 1
        or budget["spec"]["minAvailable"] < (autoscaler["spec"]["minReplicas"])
    )


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_secret_value_is_written_anywhere(render, name: str) -> None:
    docs = render(name)
    assert not objects(docs, "Secret"), "the manifests must reference Secrets, not carry them"
    for owner, pod in workloads(docs):
        for spec in all_containers(pod):
            for var in spec.get("env", []):
                if SECRET_ENV_NAME.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), (
                        f"{owner['metadata']['name']}/{spec['name']}: {var['name']} is not read from a Secret"
                    )
    text = yaml.safe_dump_all(docs)
    assert not INLINE_CREDENTIAL.findall(text), (
        f"credentials written inline: {INLINE_CREDENTIAL.findall(text)}"
    )
    for doc in docs:
        for owner, pod in workloads([doc]):
            for spec in all_containers(pod):
                args = [*spec.get("command", []), *spec.get("args", [])]
                for flag, value in itertools.pairwise(args):
                    if flag == "--requirepass":
                        assert VAR_REFERENCE.fullmatch(value), (
                            f"{owner['metadata']['name']}: literal password"
                        )
    # Every Secret the pods read is one the deploy guide tells how to create.
    guide = DEPLOY_README.read_text()
    referenced = {
        var["valueFrom"]["secretKeyRef"]["name"]
        for _, pod in workloads(docs)
        for spec in all_containers(pod)
        for var in spec.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert referenced, "no Secret is referenced at all"
    for secret in referenced:
        assert re.search(rf"kubectl .*create secret generic {secret}\b", guide), (
            f"{DEPLOY_README.name} does not show how to create the Secret {secret}"
        )


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_are_pinned_and_the_project_image_is_the_pipelines(
    kubectl: str, name: str, tmp_path: Path
) -> None:
    # As applied: `make manifests` sets the project image to this checkout's tag, the pipeline's.
    made = subprocess.run(
        [
            "make",
            "-s",
            "manifests",
            f"OVERLAY={name}",
            f"MANIFESTS_OUT={tmp_path}",
            f"IMAGES_PYTHON={sys.executable}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    rendered = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / name)], capture_output=True, text=True, timeout=120
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    for owner, pod in workloads(docs):
        for spec in all_containers(pod):
            image = spec["image"]
            label = f"{owner['metadata']['name']}/{spec['name']}"
            repository, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (repository and "/" not in tag), f"{label}: {image} has no tag"
            assert tag != "latest", f"{label}: {image} is not pinned"
            assert re.search(r"\d", tag), f"{label}: {image} is tagged without a version"
            if image.startswith(f"{REGISTRY}/"):
                assert image == CPU_IMAGE, f"{label}: {image} is not the pipeline's CPU image {CPU_IMAGE}"
    for kind, workload, spec_name in [
        ("Deployment", "fusionrank-ranker", "ranker"),
        ("Deployment", "fusionrank-ranker", "fetch-model"),
        ("Job", "fusionrank-schedule", "schedule"),
    ]:
        assert container(docs, kind, workload, spec_name)["image"] == CPU_IMAGE


@pytest.mark.parametrize("name", OVERLAYS)
def test_committed_manifests_name_the_project_image_at_its_version(render, name: str) -> None:
    for owner, pod in workloads(render(name)):
        for spec in all_containers(pod):
            if spec["image"].startswith(f"{REGISTRY}/"):
                assert spec["image"] == f"{CPU_REPOSITORY}:{__version__}", owner["metadata"]["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_ranker_serves_the_service_and_reads_the_cluster_feature_store(
    render, name: str, monkeypatch
) -> None:
    from bentoml_cli.cli import cli as bentoml_cli
    from feast.repo_config import load_repo_config

    from fusionrank.serving_logic import ServingSettings

    docs = render(name)
    deployment = one(docs, "Deployment", "fusionrank-ranker")
    ranker = container(docs, "Deployment", "fusionrank-ranker", "ranker")
    command = ranker["command"]
    assert command[:2] == ["bentoml", "serve"]
    # The arguments are valid for the pinned BentoML's `serve` (an unknown option raises here).
    context = bentoml_cli.commands["serve"].make_context("serve", command[2:])
    target, working_dir = context.params["bento"], image_path(context.params["working_dir"])
    module, _, attribute = target.partition(":")
    source = working_dir / f"{module}.py"
    assert source.is_file(), f"{target}: {source} does not exist"
    classes = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef)}
    assert attribute in classes, f"{source} defines no {attribute}"
    assert str(context.params["port"]) in {str(p["containerPort"]) for p in ranker["ports"]}

    env = resolved_env(docs, deployment, ranker)
    settings = ServingSettings.from_env(env)
    assert settings.feature_repo is not None
    assert settings.feature_store_yaml is not None
    repo, store_yaml = image_path(str(settings.feature_repo)), image_path(str(settings.feature_store_yaml))
    assert image_path(f"{settings.feature_repo}/definitions.py").is_file()
    assert store_yaml == REPO / "feature_repo" / "feature_store.cluster.yaml"
    # Every ${VAR} of the cluster configuration is set, and Feast accepts the result.
    settings_text = "\n".join(line.split("#")[0] for line in store_yaml.read_text().splitlines())
    wanted = set(re.findall(r"\$\{(\w+)\}", settings_text))
    assert wanted <= env.keys(), f"unset in the ranker: {sorted(wanted - env.keys())}"
    for key in wanted:
        monkeypatch.setenv(key, env[key])
    config = load_repo_config(repo, store_yaml)
    assert config.online_store.type == "redis"
    address, _, password = config.online_store.connection_string.partition(",password=")
    assert password == SECRET_PLACEHOLDER.format(name="fusionrank-redis", key="password")
    service_behind(f"redis://{address}", docs, deployment["metadata"]["namespace"])
    assert config.offline_store.type == "file"
    # The registry lies on the shared volume, mounted in the ranker.
    mounts = {m["mountPath"]: m["name"] for m in ranker["volumeMounts"]}
    registry_path = env["FUSIONRANK_FEAST_REGISTRY"]
    mounted = [m for m in mounts if registry_path.startswith(f"{m}/")]
    assert mounted, f"the Feast registry {registry_path} is on no volume of the ranker"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[mounted[0]]]["persistentVolumeClaim"]["claimName"]
    one(docs, "PersistentVolumeClaim", claim)

    fetch = container(docs, "Deployment", "fusionrank-ranker", "fetch-model")
    assert fetch["command"][0] == "python3"
    assert image_path(fetch["command"][1]) == REPO / "deploy" / "fetch_champion.py"
    fetch_env = resolved_env(docs, deployment, fetch)
    assert fetch_env["BENTOML_HOME"] == env["BENTOML_HOME"], "the server must read the store it is given"
    shared = {m["name"] for m in fetch["volumeMounts"] if m["mountPath"] == fetch_env["BENTOML_HOME"]}
    assert shared
    assert shared == {m["name"] for m in ranker["volumeMounts"] if m["mountPath"] == env["BENTOML_HOME"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_mlflow_server_accepts_the_uris_its_clients_use(render, name: str) -> None:
    import mlflow
    from mlflow.cli import cli as mlflow_cli
    from mlflow.server.security_utils import is_allowed_host_header

    from pipelines.training import training_pipeline

    docs = render(name)
    deployment = one(docs, "Deployment", "mlflow")
    namespace = deployment["metadata"]["namespace"]
    server = container(docs, "Deployment", "mlflow", "mlflow")
    # The server speaks the registry protocol of the client the pipeline and the ranker use.
    assert server["image"].rsplit(":", 1)[1].removeprefix("v").removesuffix("-full") == mlflow.__version__
    assert server["command"][:2] == ["mlflow", "server"]
    env = resolved_env(docs, deployment, server)
    context = mlflow_cli.commands["server"].make_context("server", server["command"][2:])
    assert context.params["host"] == "0.0.0.0"
    assert str(context.params["port"]) in {str(p["containerPort"]) for p in server["ports"]}
    assert env["MLFLOW_BACKEND_STORE_URI"] == SECRET_PLACEHOLDER.format(
        name="mlflow-backend", key="backend-store-uri"
    )
    allowed = [host.strip() for host in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    ranker = one(docs, "Deployment", "fusionrank-ranker")
    schedule = one(docs, "Job", "fusionrank-schedule")
    clients = {
        "the pipeline's default registry_uri": training_pipeline.component_spec.inputs[
            "registry_uri"
        ].default,
        "the ranker's init container": resolved_env(
            docs, ranker, container(docs, "Deployment", "fusionrank-ranker", "fetch-model")
        )["FUSIONRANK_REGISTRY_URI"],
        "the scheduled runs": resolved_env(
            docs, schedule, container(docs, "Job", "fusionrank-schedule", "schedule")
        )["REGISTRY_URI"],
        "a port-forward": "http://localhost:5000",
    }
    for who, uri in clients.items():
        host = urlsplit(uri).netloc
        assert is_allowed_host_header(allowed, host), f"MLflow would refuse {who}: Host {host}"
        if "localhost" not in host:
            assert service_behind(uri, docs, namespace)["metadata"]["name"] == "mlflow", f"{who}: {uri}"


class RecordingKfpClient:
    """The part of kfp.Client the upsert uses, answering as KFP does, recording every call."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, host: str | None = None, namespace: str | None = None, **kwargs) -> None:
        self.calls.append(("Client", {"host": host, "namespace": namespace, **kwargs}))

    def create_experiment(self, name: str, namespace: str | None = None, **kwargs) -> SimpleNamespace:
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return SimpleNamespace(experiment_id="experiment-1")

    def list_recurring_runs(self, **kwargs) -> SimpleNamespace:
        self.calls.append(("list_recurring_runs", kwargs))
        return SimpleNamespace(recurring_runs=[SimpleNamespace(recurring_run_id="recurring-old")])

    def delete_recurring_run(self, recurring_run_id: str) -> None:
        self.calls.append(("delete_recurring_run", {"recurring_run_id": recurring_run_id}))

    def create_recurring_run(self, **kwargs) -> SimpleNamespace:
        self.calls.append(("create_recurring_run", kwargs))
        return SimpleNamespace(recurring_run_id="recurring-new")


@pytest.mark.parametrize("name", OVERLAYS)
def test_schedule_job_upserts_one_recurring_run_at_a_time_without_catch_up(
    render, name: str, tmp_path: Path, monkeypatch
) -> None:
    import kfp
    from typer.testing import CliRunner

    from fusionrank.cli import app
    from pipelines.training import PIPELINE_NAME

    docs = render(name)
    job = one(docs, "Job", "fusionrank-schedule")
    spec = container(docs, "Job", "fusionrank-schedule", "schedule")
    env = resolved_env(docs, job, spec)
    argv = [expand(arg, env) for arg in [*spec["command"], *spec.get("args", [])]]
    assert not [a for a in argv if VAR_REFERENCE.search(a)], f"unresolved variables in {argv}"
    assert argv[:2] == ["fusionrank", "schedule"], "the Job runs the documented upsert"

    RecordingKfpClient.calls = []
    monkeypatch.setattr(kfp, "Client", RecordingKfpClient)
    monkeypatch.chdir(tmp_path)  # the Job's working directory: the compiled pipeline is written there
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    calls = RecordingKfpClient.calls
    client = dict(calls)["Client"]
    assert client["host"] == env["KFP_HOST"]
    assert client["namespace"] == job["metadata"]["namespace"]
    assert ("delete_recurring_run", {"recurring_run_id": "recurring-old"}) in calls, "the old run is replaced"
    created = [kwargs for call, kwargs in calls if call == "create_recurring_run"]
    assert len(created) == 1
    run = created[0]
    assert run["max_concurrency"] == 1
    assert run["no_catchup"] is True
    assert run["cron_expression"] == env["SCHEDULE_CRON"]
    assert len(run["cron_expression"].split()) == 6
    assert run["job_name"] == env["SCHEDULE_NAME"]
    assert run["experiment_id"] == "experiment-1"
    package = yaml.safe_load_all(Path(run["pipeline_package_path"]).read_text())
    assert next(package)["pipelineInfo"]["name"] == PIPELINE_NAME
    params = run["params"]
    assert params["registry_uri"] == env["REGISTRY_URI"]
    assert params["model_name"] == env["MODEL_NAME"]
    # The runs register where the ranker fetches from.
    ranker = one(docs, "Deployment", "fusionrank-ranker")
    fetch_env = resolved_env(docs, ranker, container(docs, "Deployment", "fusionrank-ranker", "fetch-model"))
    assert (
        urlsplit(params["registry_uri"]).hostname == urlsplit(fetch_env["FUSIONRANK_REGISTRY_URI"]).hostname
    )
    assert params["model_name"] == fetch_env["FUSIONRANK_MODEL_NAME"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_accounts_and_roles_grant_only_what_their_pods_use(render, name: str) -> None:
    docs = render(name)
    accounts = {sa["metadata"]["name"] for sa in objects(docs, "ServiceAccount")}
    roles = {role["metadata"]["name"]: role for role in objects(docs, "Role")}
    assert not objects(docs, "ClusterRole")
    assert not objects(docs, "ClusterRoleBinding")
    for owner, pod in workloads(docs):
        assert pod.get("serviceAccountName") in accounts, (
            f"{owner['metadata']['name']}: no own ServiceAccount"
        )
    for role in roles.values():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"Role {role['metadata']['name']} grants * {field}"
    for binding in objects(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["name"] in accounts
            assert subject["namespace"] == binding["metadata"]["namespace"]

    def grants(role: str) -> set[tuple[str, str, str]]:
        return {
            (group, resource, verb)
            for rule in roles[role]["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    # KFP v2's driver and launcher, and Argo's executor, in the run's namespace (kubeflow/pipelines 2.17).
    run_needs = {
        ("", "configmaps", "get"),
        ("", "secrets", "get"),
        ("", "pods", "get"),
        ("argoproj.io", "workflows", "get"),
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
    }
    assert grants("fusionrank-pipeline-runner") == run_needs
    # The upsert: get or create the experiment, list and delete the recurring runs of the name, create one.
    schedule_needs = {
        ("pipelines.kubeflow.org", "experiments", "list"),
        ("pipelines.kubeflow.org", "experiments", "create"),
        ("pipelines.kubeflow.org", "jobs", "list"),
        ("pipelines.kubeflow.org", "jobs", "delete"),
        ("pipelines.kubeflow.org", "jobs", "create"),
    }
    assert schedule_needs <= grants("fusionrank-scheduler")
    job_pod = one(docs, "Job", "fusionrank-schedule")["spec"]["template"]["spec"]
    assert job_pod["serviceAccountName"] == "fusionrank-scheduler"
    # The scheduler's token is the one for the KFP API's audience, not the default API-server token.
    assert job_pod["automountServiceAccountToken"] is False
    audiences = [
        source["serviceAccountToken"]["audience"]
        for volume in job_pod["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    ]
    assert audiences == ["pipelines.kubeflow.org"]


def test_overlays_differ_where_environments_should(render) -> None:
    autoscalers = {
        name: one(render(name), "HorizontalPodAutoscaler", "fusionrank-ranker") for name in OVERLAYS
    }
    assert set(OVERLAYS) >= {"dev", "prod"}
    assert autoscalers["prod"]["spec"]["minReplicas"] > autoscalers["dev"]["spec"]["minReplicas"]
    assert autoscalers["prod"]["spec"]["minReplicas"] >= 2, "prod keeps serving through a pod's loss"
    schedules = {
        name: config_value(render(name), {"name": _schedule_config(render(name)), "key": "SCHEDULE_NAME"})
        for name in OVERLAYS
    }
    assert len(set(schedules.values())) == len(OVERLAYS), (
        f"two environments share a recurring run: {schedules}"
    )


def _schedule_config(docs: list[dict]) -> str:
    spec = container(docs, "Job", "fusionrank-schedule", "schedule")
    refs = {
        v["valueFrom"]["configMapKeyRef"]["name"]
        for v in spec["env"]
        if "configMapKeyRef" in v.get("valueFrom", {})
    }
    assert len(refs) == 1
    return refs.pop()


# ---------------------------------------------------------------------------------------------------------
# The Dockerfile and the image names


def test_make_images_builds_each_dockerfile_target_under_the_pipelines_image_name() -> None:
    result = subprocess.run(
        ["make", "-n", "-f", str(IMAGES_MK), "images", f"IMAGES_PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    built = {}
    for line in result.stdout.splitlines():
        if " build " in line:
            target = re.search(r"--target (\S+)", line).group(1)
            built[target] = re.search(r"-t (\S+)", line).group(1)
            assert f"--build-arg VERSION={__version__}" in line
    assert built == {"cpu": CPU_IMAGE, "gpu": GPU_IMAGE}
    stages = dockerfile_stages()
    assert set(built) <= stages.keys(), f"the Dockerfile has no stage for {set(built) - stages.keys()}"


def test_dockerfile_pins_every_base_image() -> None:
    stages = dockerfile_stages()
    defaults = {}
    for instructions in stages.values():
        for keyword, rest in instructions:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                defaults.setdefault(key, value)
    for name, instructions in stages.items():
        if not name:
            continue
        base = instructions[0][1]
        if base in stages:
            continue
        match = re.fullmatch(r"\$\{?(\w+)\}?", base)
        assert match, f"stage {name}: the base {base} is not a build argument"
        image = defaults.get(match.group(1), "")
        assert image, f"stage {name}: the build argument {match.group(1)} has no default"
        repository, _, tag = image.rpartition(":")
        assert repository, f"{image} has no tag"
        assert "/" not in tag, f"{image} has no tag"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image} is not pinned to a version (latest, or no patch)"


def test_dockerfile_installs_under_the_constraints_with_torch_first_and_nothing_at_run_time() -> None:
    stages = dockerfile_stages()
    constraints = (REPO / "constraints.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", constraints, flags=re.MULTILINE).group(1)
    builds = [name for name in stages if name.startswith("build-")]
    assert builds
    for name in builds:
        runs = [rest for keyword, rest in stages[name] if keyword == "RUN"]
        assert runs[0] == "python3 -m venv /opt/venv", f"{name}: the venv is not made with python3 -m venv"
        installs = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
        assert f"torch=={torch_pin}" in installs[0], f"{name}: torch {torch_pin} is not installed first"
        for install in installs[1:]:
            assert "-c constraints.txt" in install, f"{name}: {install} ignores constraints.txt"
        # The dependency stage holds no project code: a code change must not rebuild it.
        copied = [rest for keyword, rest in stages[name] if keyword == "COPY"]
        assert all(not re.search(r"\b(src|components|pipelines|serving)\b", rest) for rest in copied), copied
    for name in ("cpu", "gpu"):
        instructions = stages[name]
        # The final stage only links the project to its code: no dependency, nothing from an index.
        installs = [
            part.strip()
            for keyword, rest in instructions
            if keyword == "RUN"
            for part in rest.split("&&")
            if re.search(r"\bpip\b", part)
        ]
        assert all(p.startswith("pip install --no-deps --no-index") or p == "pip check" for p in installs), (
            installs
        )
        assert "pip check" in installs, f"{name}: the build does not check that every dependency is there"
        command = " ".join(rest for keyword, rest in instructions if keyword in ("CMD", "ENTRYPOINT"))
        assert "pip" not in command
        # The final stage continues from its dependency stage (the venv stays where it was built, its
        # python link valid) and adds the code on top: a code-only change reuses the venv's layer.
        assert instructions[0][1] == f"build-{name}"
        assert not [rest for keyword, rest in instructions if "--from" in rest]


def test_dockerfile_final_stages_run_as_the_non_root_user_of_the_pods(render) -> None:
    stages = dockerfile_stages()
    docs = render("base")
    pod_users = {
        {**pod.get("securityContext", {}), **spec.get("securityContext", {})}.get("runAsUser")
        for _, pod in workloads(docs)
        for spec in all_containers(pod)
        if spec["image"].startswith(f"{CPU_REPOSITORY}:")
    }
    for name in ("cpu", "gpu"):
        users = [rest for keyword, rest in stages[name] if keyword == "USER"]
        assert users, f"stage {name} runs as root"
        uid = users[-1].split(":")[0]
        # Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
        assert uid.isdigit(), f"stage {name}: USER {users[-1]} is not numeric"
        assert int(uid) != 0, f"stage {name} runs as root"
        assert pod_users == {int(uid)}, f"pods run the image as {pod_users}, the image's user is {uid}"


def test_dockerfile_copies_the_code_layout_the_package_expects() -> None:
    import fusionrank
    from fusionrank.features import default_feature_repo
    from fusionrank.packaging import default_serving_dir

    copied = image_sources()
    for _destination, source in copied.items():
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is not in the checkout"
    # The package finds serving/ and feature_repo/ beside src/: the image keeps that layout.
    package_root = Path(fusionrank.__file__).resolve().parents[2]
    for folder in (default_serving_dir(), default_feature_repo()):
        relative = folder.relative_to(package_root)
        assert any(str(relative) == d or d.startswith(f"{relative}/") for d in copied), (
            f"{relative} not copied"
        )
    for package in ("src", "components", "pipelines"):
        assert package in copied, f"{package}/ is not in the image"
    for required in ("definitions.py", "feature_store.cluster.yaml"):
        assert f"feature_repo/{required}" in copied


# ---------------------------------------------------------------------------------------------------------
# The guide


def test_deploy_guide_commands_exist() -> None:
    from fusionrank.cli import app

    guide = DEPLOY_README.read_text()
    blocks = "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", guide, flags=re.DOTALL))
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {group.name for group in app.registered_groups}
    used = set(re.findall(r"^\s*fusionrank (\w[\w-]*)", blocks, flags=re.MULTILINE))
    assert used, "the guide runs no fusionrank command"
    assert used <= commands, f"the guide uses unknown commands: {used - commands}"
    for overlay in re.findall(r"manifests/overlays/(\w+)", blocks):
        assert overlay in OVERLAYS, f"the guide names an overlay that does not exist: {overlay}"
    makefiles = IMAGES_MK.read_text() + (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefiles, flags=re.MULTILINE))
    for target in re.findall(r"^\s*make ([\w-]+)", blocks, flags=re.MULTILINE):
        assert target in targets, f"the guide runs `make {target}`, which no Makefile defines"


# ---------------------------------------------------------------------------------------------------------
# The ranker's init container, for real against an MLflow registry


@pytest.mark.slow
def test_fetch_champion_puts_the_champion_into_the_bentoml_store(render, tmp_path: Path) -> None:
    from fusionrank.packaging import BUNDLE_DIR, MODEL_NAME
    from fusionrank.registry import Registry

    fetch = container(render("base"), "Deployment", "fusionrank-ranker", "fetch-model")
    script = image_path(fetch["command"][1])
    registry_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {"mode": "search", "selected_fusion": "lambdamart", "feature_service": "fusionrank_ranker_v1"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "weights.bin").write_bytes(os.urandom(256))
    registry = Registry(registry_uri, "fusionrank-test")
    version = registry.register(bundle, "run-1", tags={"data_hash": "abc"}).version
    home = tmp_path / "bentoml"
    env = {
        **os.environ,
        "FUSIONRANK_REGISTRY_URI": registry_uri,
        "FUSIONRANK_MODEL_NAME": "fusionrank-test",
        "FUSIONRANK_MODEL_VERSION": "champion",
        "BENTOML_HOME": str(home),
    }

    def fetch_model() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    # Registered but never promoted: no champion yet, one line saying so.
    missing = fetch_model()
    assert missing.returncode == 1
    assert "champion" in missing.stderr
    assert "Traceback" not in missing.stderr

    registry.promote(version)
    first = fetch_model()
    assert first.returncode == 0, first.stderr
    tag = first.stdout.split(":")[0] + ":" + first.stdout.split(":")[1]
    model_dir = home / "models" / MODEL_NAME / tag.split(":")[1]
    assert json.loads((model_dir / BUNDLE_DIR / "manifest.json").read_text()) == manifest
    assert (model_dir / BUNDLE_DIR / "weights.bin").read_bytes() == (bundle / "weights.bin").read_bytes()
    labels = yaml.safe_load((model_dir / "model.yaml").read_text())["labels"]
    assert labels["registered_version"] == str(version)
    assert labels["fusion"] == "lambdamart"
    # The server's default `fusionrank-ranker:latest` is this model.
    assert (home / "models" / MODEL_NAME / "latest").read_text().strip() == tag.split(":")[1]

    # A restarted init container keeps what it fetched.
    again = fetch_model()
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(tag)
    assert len([p for p in (home / "models" / MODEL_NAME).iterdir() if p.is_dir()]) == 1
