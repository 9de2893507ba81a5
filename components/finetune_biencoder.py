from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def finetune_biencoder(
    dataset: Input[Dataset],
    splits: Input[Dataset],
    feature_store: Input[Artifact],
    signals: Input[Model],
    bert: Input[Model],
    scored_frames: Input[Dataset],
    base_model: str,
    tiny_model: bool,
    epochs: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    max_train_samples: int,
    embed_max_products: int,
    hybrid_k: int,
    int8: bool,
    seed: int,
    user_vectors_max: int,
    distill_weight: float,
    teacher_scale: float,
    group_size: int,
    negatives: int,
    hard_pool: int,
    distill_loss: str,
    all_signals: Output[Model],
    dense_frames: Output[Dataset],
    metrics: Output[Metrics],
):
    """Distil the cross-encoder into a bi-encoder; embed the catalog; add dense scores and candidates."""
    from fusionrank.steps import biencoder_step

    figures = biencoder_step(
        dataset.path,
        splits.path,
        feature_store.path,
        signals.path,
        bert.path,
        scored_frames.path,
        base_model,
        tiny_model,
        epochs,
        batch_size,
        max_length,
        learning_rate,
        max_train_samples,
        embed_max_products,
        hybrid_k,
        int8,
        seed,
        all_signals.path,
        dense_frames.path,
        user_vectors_max,
        distill_weight,
        teacher_scale,
        group_size,
        negatives,
        hard_pool,
        distill_loss,
    )
    for name, value in figures.items():
        metrics.log_metric(name.replace("@", "_at_"), value)
