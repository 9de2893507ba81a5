from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def finetune_bert(
    dataset: Input[Dataset],
    splits: Input[Dataset],
    signals: Input[Model],
    frames: Input[Dataset],
    base_model: str,
    tiny_model: bool,
    epochs: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    max_train_samples: int,
    max_steps: int,
    seed: int,
    bert: Output[Model],
    scored_frames: Output[Dataset],
    metrics: Output[Metrics],
):
    """Fine-tune the cross-encoder on the training split, then score every evaluation candidate with it."""
    from fusionrank.steps import finetune_step

    figures = finetune_step(
        dataset.path,
        splits.path,
        signals.path,
        frames.path,
        base_model,
        tiny_model,
        epochs,
        batch_size,
        max_length,
        learning_rate,
        max_train_samples,
        max_steps,
        seed,
        bert.path,
        scored_frames.path,
    )
    for name, value in figures.items():
        metrics.log_metric(name, value)
