from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def split(dataset: Input[Dataset], seed: int, valid_frac: float, test_frac: float, splits: Output[Dataset]):
    """Split without leaks: by query for search, leave-last-out per user for recommendation."""
    from fusionrank.steps import split_step

    splits.metadata.update(split_step(dataset.path, splits.path, seed, valid_frac, test_frac))
