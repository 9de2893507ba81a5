"""The compiled pipeline spec: what a cluster would be told to run (read from the IR YAML itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.images import CPU_IMAGE, GPU_IMAGE, IMAGE_TAG
from fusionrank import __version__
from fusionrank.orchestration import compile_pipeline

SHIPPING = {"package", "register"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    path = compile_pipeline(tmp_path_factory.mktemp("spec") / "pipeline.yaml")
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert len(docs) == 2, "the Kubernetes platform document is missing"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(ir: dict) -> dict[str, tuple[str, dict]]:
    """Every task by name, with the dag (root or condition component) that holds it."""
    found = {name: ("root", task) for name, task in ir["root"]["dag"]["tasks"].items()}
    for comp_name, comp in ir["components"].items():
        for name, task in comp.get("dag", {}).get("tasks", {}).items():
            found[name] = (comp_name, task)
    return found


def executor(ir: dict, task: dict) -> dict:
    component = ir["components"][task["componentRef"]["name"]]
    return ir["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def test_finetune_requests_a_gpu_tolerates_gpu_nodes_and_mounts_shm(spec):
    ir, k8s = spec
    _, task = all_tasks(ir)["finetune-bert"]
    resources = executor(ir, task)["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    platform = k8s["exec-finetune-bert"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in platform["tolerations"]
    assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in platform["emptyDirMounts"]


def test_every_task_has_requests_limits_and_a_pinned_image(spec):
    ir, _ = spec
    for name, (_, task) in all_tasks(ir).items():
        if "componentRef" not in task or name.startswith("condition"):
            continue
        container = executor(ir, task)
        image = container["image"]
        assert ":" in image, f"{name}: image {image} has no tag"
        assert not image.endswith(":latest"), f"{name}: image {image} is not pinned"
        # the version and the commit: exactly what `make image` / `make images` build from this checkout
        assert image.endswith(f":{IMAGE_TAG}"), f"{name}: image {image} is not tagged {IMAGE_TAG}"
        assert IMAGE_TAG.startswith(f"{__version__}-"), IMAGE_TAG
        resources = container["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert key in resources, f"{name} lacks {key}"
    _, finetune = all_tasks(ir)["finetune-bert"]
    assert executor(ir, finetune)["image"] == GPU_IMAGE
    _, ingest = all_tasks(ir)["ingest"]
    assert executor(ir, ingest)["image"] == CPU_IMAGE


def test_caching_is_an_explicit_choice_per_task(spec):
    ir, _ = spec
    tasks = all_tasks(ir)
    # pure functions of their inputs are cached; steps with side effects or a moving champion are not
    for cached in ("ingest", "validate", "split", "candidates", "finetune-bert", "fit-fusion"):
        assert tasks[cached][1]["cachingOptions"] == {"enableCache": True}, cached
    for uncached in ("features", "evaluate", "drift", "gate", "package", "register", "assert-valid"):
        assert tasks[uncached][1]["cachingOptions"] in ({}, {"enableCache": False}), uncached


def test_retries_only_where_safe(spec):
    ir, _ = spec
    tasks = all_tasks(ir)
    assert tasks["ingest"][1]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["finetune-bert"][1]
    assert "retryPolicy" not in tasks["gate"][1]


def test_package_and_register_run_only_on_approval(spec):
    ir, _ = spec
    tasks = all_tasks(ir)
    holders = {tasks[name][0] for name in SHIPPING}
    assert len(holders) == 1, "package and register must sit inside one condition"
    assert "root" not in holders, "package and register must not run unconditionally"
    condition = tasks[next(iter(holders)).removeprefix("comp-")][1]
    expression = condition["triggerPolicy"]["condition"]
    assert "gate" in expression
    assert "'approve'" in expression
    rejected = tasks["report-rejection"][0]
    assert rejected not in holders
    assert rejected != "root"


def test_training_waits_for_the_validation_verdict(spec):
    ir, _ = spec
    tasks = all_tasks(ir)
    assert "assert-valid" in tasks["split"][1]["dependentTasks"]


def test_steps_that_open_the_feature_store_get_its_cluster_settings(spec):
    _, k8s = spec
    for task in ("features", "candidates", "finetune-biencoder"):
        platform = k8s[f"exec-{task}"]
        (config,) = platform["configMapAsEnv"]
        assert config["configMapName"] == "fusionrank-feature-store"
        assert config["optional"] is True
        keys = {entry["configMapKey"] for entry in config["keyToEnv"]}
        assert {"FUSIONRANK_FEAST_REGISTRY", "FUSIONRANK_REDIS_ADDRESS"} <= keys
        (secret,) = platform["secretAsEnv"]
        assert secret["secretName"] == "fusionrank-redis"
        assert secret["optional"] is True
        assert secret["keyToEnv"] == [{"secretKey": "password", "envVar": "FUSIONRANK_REDIS_PASSWORD"}]
        (volume,) = platform["pvcMount"]
        assert volume["mountPath"] == "/mnt/feast"
    assert "configMapAsEnv" not in k8s.get("exec-fit-fusion", {})


def test_the_biencoder_runs_after_the_cross_encoder_on_a_gpu_and_feeds_fusion(spec):
    ir, k8s = spec
    tasks = all_tasks(ir)
    _, bi = tasks["finetune-biencoder"]
    assert "finetune-bert" in bi["dependentTasks"]
    assert executor(ir, bi)["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[
        "exec-finetune-biencoder"
    ]["tolerations"]
    for consumer in ("fit-fusion", "evaluate", "drift"):
        assert "finetune-biencoder" in tasks[consumer][1]["dependentTasks"], consumer


def test_ingest_reads_the_data_volume_and_cluster_runs_point_at_it(spec):
    from fusionrank.orchestration import cluster_params
    from pipelines.training import CLUSTER_DATA_DIR

    _, k8s = spec
    (volume,) = k8s["exec-ingest"]["pvcMount"]
    assert volume["mountPath"] == CLUSTER_DATA_DIR
    assert volume["constant"] == "fusionrank-data"
    one_off = cluster_params({"source": "homedepot"})
    assert one_off["data_dir"] == CLUSTER_DATA_DIR
    assert one_off["git_revision"]
    assert cluster_params({"data_dir": "/elsewhere"}, with_revision=False) == {"data_dir": "/elsewhere"}


def test_every_pipeline_parameter_reaches_a_task(spec):
    ir, _ = spec
    read: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "componentInputParameter" in node:
                read.add(node["componentInputParameter"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(ir["root"]["dag"])
    assert set(ir["root"]["inputDefinitions"]["parameters"]) - read == set(), "parameters no task reads"
    _, bi = all_tasks(ir)["finetune-biencoder"]
    for name in ("distill_weight", "teacher_scale", "group_size", "negatives", "hard_pool", "distill_loss"):
        assert bi["inputs"]["parameters"][name] == {"componentInputParameter": f"bi_{name}"}
