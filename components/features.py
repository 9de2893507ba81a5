from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def features(
    dataset: Input[Dataset],
    splits: Input[Dataset],
    feature_service_version: str,
    feature_store_env: str,
    feature_store: Output[Artifact],
) -> str:
    """Write the offline sources, apply the Feast repo, materialize online; return the FeatureService name."""
    from fusionrank.steps import features_step

    info = features_step(
        dataset.path, splits.path, feature_store.path, feature_service_version, feature_store_env
    )
    feature_store.metadata.update(info)
    return info["feature_service"]
