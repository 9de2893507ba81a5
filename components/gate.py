from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    drift_result: Input[Artifact],
    gate_config: dict,
    decision: Output[Artifact],
) -> str:
    """One decision from thresholds, the champion comparison and drift: "approve" or "reject"."""
    from fusionrank.steps import gate_step

    result = gate_step(evaluation.path, drift_result.path, gate_config, decision.path)
    decision.metadata.update(result)
    return "approve" if result["approved"] else "reject"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report_rejection(decision: Input[Artifact], summary: Output[Markdown]) -> str:
    """The rejected branch: write why, register nothing."""
    from fusionrank.steps import rejection_summary

    rejection_summary(decision.path, summary.path)
    return "rejected"
