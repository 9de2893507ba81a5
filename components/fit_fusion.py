from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fit_fusion(scored_frames: Input[Dataset], cascade_k: int, seed: int, fusion: Output[Model]) -> str:
    """Fit weighted, cascade and LambdaMART fusion on the validation frame; return the best strategy."""
    from fusionrank.steps import fusion_step

    info = fusion_step(scored_frames.path, fusion.path, cascade_k, seed)
    fusion.metadata.update({"selected": info["selected"], "selection_ndcg@10": info["selection_ndcg@10"]})
    return info["selected"]
