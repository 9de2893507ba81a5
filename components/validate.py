from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate(dataset: Input[Dataset], report: Output[HTML], result: Output[Artifact]) -> str:
    """Run the Great Expectations suites; return "passed" or "failed" (the pipeline branches on it)."""
    from fusionrank.steps import validate_step

    outcome = validate_step(dataset.path, report.path, result.path)
    result.metadata.update({"success": outcome["success"], "failures": len(outcome["failures"])})
    return "passed" if outcome["success"] else "failed"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def assert_valid(verdict: str, result: Input[Artifact]):
    """Fail the run with the validation summary when the data is bad, so that nothing downstream runs."""
    from fusionrank.steps import assert_valid_data

    assert_valid_data(verdict, result.path)
