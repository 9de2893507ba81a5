from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def candidates(
    dataset: Input[Dataset],
    splits: Input[Dataset],
    feature_store: Input[Artifact],
    candidates_k: int,
    max_eval_requests: int,
    seed: int,
    seq_epochs: int,
    seq_max_seconds: float,
    signals: Output[Model],
    frames: Output[Dataset],
    metrics: Output[Metrics],
):
    """Fit the traditional signals (SASRec too for users, when seq_epochs > 0) on the training split and
    build scored candidate frames."""
    from fusionrank.steps import candidates_step

    figures = candidates_step(
        dataset.path,
        splits.path,
        feature_store.path,
        signals.path,
        frames.path,
        candidates_k,
        max_eval_requests,
        seed,
        seq_epochs=seq_epochs,
        seq_max_seconds=seq_max_seconds,
    )
    for name, value in figures.items():
        metrics.log_metric(name, value)
