"""The training pipeline: it only wires components and parameters (the logic lives in `fusionrank`)."""

from kfp import dsl, kubernetes

from components.candidates import candidates
from components.drift import drift
from components.evaluate import evaluate
from components.features import features
from components.finetune_bert import finetune_bert
from components.finetune_biencoder import finetune_biencoder
from components.fit_fusion import fit_fusion
from components.gate import gate, report_rejection
from components.ingest import ingest
from components.package import package
from components.register import register
from components.split import split
from components.validate import assert_valid, validate

PIPELINE_NAME = "fusionrank-training"

# Requests and limits per kind of step (CPU, memory); the fine-tuning step adds a GPU.
LIGHT = ("500m", "1", "1Gi", "2Gi")
MEDIUM = ("1", "2", "4Gi", "8Gi")
HEAVY = ("2", "4", "8Gi", "16Gi")
GPU_NODE_TAINT = "nvidia.com/gpu"

DEFAULT_GATE = {
    "metric": "ndcg@10",
    "floors": {"ndcg@10": 0.0},
    "min_gain_over_champion": 0.0,
    "significance_level": 0.05,
    "require_significance": False,
    "max_drift_share": 0.5,
    "force": "auto",
}


# What a step that opens the run's feature store needs on a cluster (`feature_store_env=cluster`): the
# store's settings from the fusionrank-feature-store ConfigMap, the Redis password from the fusionrank-redis
# Secret (fusionrank.features composes FUSIONRANK_REDIS from the two), and the registry's volume. Both
# sources are optional, so a run with the local store needs neither; manifests/base creates all three.
FEATURE_STORE_CONFIG = "fusionrank-feature-store"
FEATURE_STORE_KEYS = (
    "FUSIONRANK_FEAST_REGISTRY",
    "FUSIONRANK_FEAST_OFFLINE_STORE",
    "FUSIONRANK_REDIS_ADDRESS",
)
REDIS_SECRET = "fusionrank-redis"
REGISTRY_CLAIM = "fusionrank-feast-registry"
REGISTRY_MOUNT = "/mnt/feast"
# The source files on a cluster: the fusionrank-data volume (manifests/base/pipeline-runs.yaml).
DATA_CLAIM = "fusionrank-data"
CLUSTER_DATA_DIR = "/mnt/fusionrank-data"


def _feature_store_access(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_config_map_as_env(
        task, FEATURE_STORE_CONFIG, {key: key for key in FEATURE_STORE_KEYS}, optional=True
    )
    kubernetes.use_secret_as_env(task, REDIS_SECRET, {"password": "FUSIONRANK_REDIS_PASSWORD"}, optional=True)
    kubernetes.mount_pvc(task, pvc_name=REGISTRY_CLAIM, mount_path=REGISTRY_MOUNT)
    return task


def _gpu_node(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One GPU, the GPU nodes' taint tolerated, a memory-backed /dev/shm, and a time limit."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_toleration(task, key=GPU_NODE_TAINT, operator="Exists", effect="NoSchedule")
    # PyTorch data loader workers share tensors through /dev/shm, which defaults to 64 MB in a pod.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    kubernetes.set_timeout(task, seconds=6 * 3600)
    return task


def _resources(task: dsl.PipelineTask, size: tuple[str, str, str, str], retries: int = 0) -> dsl.PipelineTask:
    cpu_request, cpu_limit, memory_request, memory_limit = size
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    if retries:
        # Safe to retry: the step only reads its inputs and rewrites its own outputs.
        task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Train, gate and ship a BERT + classic-signal fusion ranker.")
def training_pipeline(
    source: str = "homedepot",
    data_dir: str = "",
    max_queries: int = 0,
    max_users: int = 0,
    seed: int = 0,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    feature_service_version: str = "v1",
    feature_store_env: str = "local",
    candidates_k: int = 100,
    max_eval_requests: int = 0,
    seq_epochs: int = 20,
    seq_max_seconds: float = 0.0,
    base_model: str = "",
    tiny_model: bool = False,
    bert_epochs: int = 1,
    bert_batch_size: int = 64,
    bert_max_length: int = 64,
    bert_learning_rate: float = 5e-5,
    bert_max_train_samples: int = 0,
    bert_max_steps: int = 0,
    bi_epochs: int = 1,
    bi_batch_size: int = 32,
    bi_max_length: int = 48,
    bi_learning_rate: float = 5e-5,
    bi_max_train_samples: int = 0,
    bi_distill_weight: float = 1.0,
    bi_teacher_scale: float = 1.0,
    bi_group_size: int = 8,
    bi_negatives: int = 7,
    bi_hard_pool: int = 30,
    bi_distill_loss: str = "margin_mse",
    embed_max_products: int = 0,
    user_vectors_max: int = -1,
    hybrid_k: int = 20,
    int8_serving: bool = True,
    rerank_k_cpu: int = 0,
    rerank_k_gpu: int = -1,
    cascade_k: int = 20,
    gate_config: dict = DEFAULT_GATE,
    registry_uri: str = "http://mlflow.fusionrank.svc.cluster.local:5000",
    model_name: str = "fusionrank-ranker",
    promote: bool = True,
    git_revision: str = "",
) -> str:
    """Ingest, validate, split, features, candidates, BERT, bi-encoder, fusion, evaluation, gate, shipping."""
    ingest_task = _resources(
        ingest(
            source=source, data_dir=data_dir, max_queries=max_queries, max_users=max_users, seed=seed
        ).set_caching_options(True),
        MEDIUM,
        retries=2,
    )
    kubernetes.mount_pvc(ingest_task, pvc_name=DATA_CLAIM, mount_path=CLUSTER_DATA_DIR)
    validate_task = _resources(
        validate(dataset=ingest_task.outputs["dataset"]).set_caching_options(True), MEDIUM
    )
    # Bad data stops the run here, after the report is saved as the validate task's artifact.
    assert_task = _resources(
        assert_valid(
            verdict=validate_task.outputs["Output"], result=validate_task.outputs["result"]
        ).set_caching_options(False),
        LIGHT,
    )
    split_task = _resources(
        split(dataset=ingest_task.outputs["dataset"], seed=seed, valid_frac=valid_frac, test_frac=test_frac)
        .after(assert_task)
        .set_caching_options(True),
        LIGHT,
    )
    features_task = _resources(
        features(
            dataset=ingest_task.outputs["dataset"],
            splits=split_task.outputs["splits"],
            feature_service_version=feature_service_version,
            feature_store_env=feature_store_env,
        ).set_caching_options(False),  # it writes the online store, a side effect a cache hit would skip
        MEDIUM,
        retries=2,
    )
    _feature_store_access(features_task)
    candidates_task = _resources(
        candidates(
            dataset=ingest_task.outputs["dataset"],
            splits=split_task.outputs["splits"],
            feature_store=features_task.outputs["feature_store"],
            candidates_k=candidates_k,
            max_eval_requests=max_eval_requests,
            seed=seed,
            seq_epochs=seq_epochs,
            seq_max_seconds=seq_max_seconds,
        ).set_caching_options(True),
        HEAVY,
    )
    _feature_store_access(candidates_task)
    finetune_task = _resources(
        finetune_bert(
            dataset=ingest_task.outputs["dataset"],
            splits=split_task.outputs["splits"],
            signals=candidates_task.outputs["signals"],
            frames=candidates_task.outputs["frames"],
            base_model=base_model,
            tiny_model=tiny_model,
            epochs=bert_epochs,
            batch_size=bert_batch_size,
            max_length=bert_max_length,
            learning_rate=bert_learning_rate,
            max_train_samples=bert_max_train_samples,
            max_steps=bert_max_steps,
            seed=seed,
        ).set_caching_options(True),
        HEAVY,
    )
    _gpu_node(finetune_task)

    biencoder_task = _resources(
        finetune_biencoder(
            dataset=ingest_task.outputs["dataset"],
            splits=split_task.outputs["splits"],
            feature_store=features_task.outputs["feature_store"],
            signals=candidates_task.outputs["signals"],
            bert=finetune_task.outputs["bert"],
            scored_frames=finetune_task.outputs["scored_frames"],
            base_model=base_model,
            tiny_model=tiny_model,
            epochs=bi_epochs,
            batch_size=bi_batch_size,
            max_length=bi_max_length,
            learning_rate=bi_learning_rate,
            max_train_samples=bi_max_train_samples,
            embed_max_products=embed_max_products,
            hybrid_k=hybrid_k,
            int8=int8_serving,
            seed=seed,
            user_vectors_max=user_vectors_max,
            distill_weight=bi_distill_weight,
            teacher_scale=bi_teacher_scale,
            group_size=bi_group_size,
            negatives=bi_negatives,
            hard_pool=bi_hard_pool,
            distill_loss=bi_distill_loss,
        ).set_caching_options(True),
        HEAVY,
    )
    _feature_store_access(biencoder_task)
    _gpu_node(biencoder_task)
    scored_frames = biencoder_task.outputs["dense_frames"]

    fusion_task = _resources(
        fit_fusion(scored_frames=scored_frames, cascade_k=cascade_k, seed=seed).set_caching_options(True),
        MEDIUM,
    )
    evaluate_task = _resources(
        evaluate(
            scored_frames=scored_frames,
            fusion=fusion_task.outputs["fusion"],
            registry_uri=registry_uri,
            model_name=model_name,
            source=source,
        ).set_caching_options(False),  # the champion it compares with can change between runs
        MEDIUM,
        retries=1,
    )
    drift_task = _resources(
        drift(
            scored_frames=scored_frames,
            fusion=fusion_task.outputs["fusion"],
            registry_uri=registry_uri,
            model_name=model_name,
        ).set_caching_options(False),
        MEDIUM,
        retries=1,
    )
    gate_task = _resources(
        gate(
            evaluation=evaluate_task.outputs["evaluation"],
            drift_result=drift_task.outputs["drift_result"],
            gate_config=gate_config,
        ).set_caching_options(False),
        LIGHT,
    )
    with dsl.If(gate_task.outputs["Output"] == "approve", name="gate-approved"):
        package_task = _resources(
            package(
                dataset=ingest_task.outputs["dataset"],
                signals=biencoder_task.outputs["all_signals"],
                bert=finetune_task.outputs["bert"],
                fusion=fusion_task.outputs["fusion"],
                feature_store=features_task.outputs["feature_store"],
                scored_frames=scored_frames,
                data_hash=ingest_task.outputs["data_hash"],
                feature_service=features_task.outputs["Output"],
                git_revision=git_revision,
                rerank_k_cpu=rerank_k_cpu,
                rerank_k_gpu=rerank_k_gpu,
                int8=int8_serving,
            ).set_caching_options(False),
            MEDIUM,
        )
        register_task = _resources(
            register(
                bundle=package_task.outputs["bundle"],
                evaluation=evaluate_task.outputs["evaluation"],
                registry_uri=registry_uri,
                model_name=model_name,
                run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                bento=package_task.outputs["Output"],
                promote=promote,
            ).set_caching_options(False),
            LIGHT,
            retries=2,
        )
    with dsl.Else(name="gate-rejected"):
        rejection_task = _resources(
            report_rejection(decision=gate_task.outputs["decision"]).set_caching_options(False), LIGHT
        )
    outcome = dsl.OneOf(register_task.output, rejection_task.outputs["Output"])
    return outcome
