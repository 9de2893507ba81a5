from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def package(
    dataset: Input[Dataset],
    signals: Input[Model],
    bert: Input[Model],
    fusion: Input[Model],
    feature_store: Input[Artifact],
    scored_frames: Input[Dataset],
    data_hash: str,
    feature_service: str,
    git_revision: str,
    rerank_k_cpu: int,
    rerank_k_gpu: int,
    int8: bool,
    bundle: Output[Model],
) -> str:
    """Assemble the ranker bundle, save it to the BentoML store, build a Bento; return the Bento tag."""
    from fusionrank.steps import package_step

    info = package_step(
        dataset.path,
        signals.path,
        bert.path,
        fusion.path,
        feature_store.path,
        scored_frames.path,
        data_hash,
        feature_service,
        bundle.path,
        git_revision,
        rerank_k_cpu,
        rerank_k_gpu,
        int8,
    )
    bundle.metadata.update(info)
    return info["bento"]
