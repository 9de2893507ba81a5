from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def drift(
    scored_frames: Input[Dataset],
    fusion: Input[Model],
    registry_uri: str,
    model_name: str,
    drift_report: Output[HTML],
    drift_result: Output[Artifact],
) -> float:
    """Evidently data and prediction drift of this run against the champion's training data."""
    from fusionrank.steps import drift_step

    result = drift_step(
        scored_frames.path, fusion.path, registry_uri, model_name, drift_report.path, drift_result.path
    )
    drift_result.metadata.update(result)
    return float(result["drift_share"])
