from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    scored_frames: Input[Dataset],
    fusion: Input[Model],
    registry_uri: str,
    model_name: str,
    source: str,
    evaluation: Output[Artifact],
    table: Output[Markdown],
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Every signal and fusion on the test split, per slice, and the candidate against the champion."""
    from fusionrank.steps import evaluate_step

    figures = evaluate_step(
        scored_frames.path,
        fusion.path,
        registry_uri,
        model_name,
        evaluation.path,
        table.path,
        source,
        report.path,
    )
    for name, value in figures.items():
        metrics.log_metric(name, value)
