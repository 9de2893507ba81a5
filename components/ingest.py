from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    source: str,
    data_dir: str,
    max_queries: int,
    max_users: int,
    seed: int,
    dataset: Output[Dataset],
) -> NamedTuple("IngestOutputs", [("data_hash", str), ("mode", str)]):
    """Turn a source into canonical parquet tables, with a content hash for lineage."""
    from fusionrank.steps import ingest_step

    manifest = ingest_step(source, data_dir or None, max_queries, max_users, seed, dataset.path)
    dataset.metadata.update({"data_hash": manifest["data_hash"], "rows": manifest["rows"]})
    return (manifest["data_hash"], manifest["modes"][0])
