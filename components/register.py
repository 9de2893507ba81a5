from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    bundle: Input[Model],
    evaluation: Input[Artifact],
    registry_uri: str,
    model_name: str,
    run_id: str,
    bento: str,
    promote: bool,
) -> str:
    """Register the approved bundle as a new version (idempotent per run); promote it to champion if asked."""
    from fusionrank.steps import register_step

    return register_step(bundle.path, evaluation.path, registry_uri, model_name, run_id, bento, promote)
