"""The ingest step: a source (or canonical parquet of one's own) -> canonical tables + a lineage manifest."""

from __future__ import annotations

import json
from pathlib import Path

from fusionrank.data.contract import Tables
from fusionrank.data.sources import default_data_dir, get_source, load_source, sample

PARQUET_PREFIX = "parquet:"
MANIFEST = "manifest.json"


def load_tables(name: str, data_dir: str | Path | None = None) -> tuple[Tables, dict[str, str]]:
    """Load a named source, or `parquet:DIR` holding canonical tables; also return each table's origin."""
    if name.startswith(PARQUET_PREFIX):
        directory = Path(name[len(PARQUET_PREFIX) :])
        tables = Tables.read(directory)
        return tables, {table: str(directory / f"{table}.parquet") for table, _ in tables.items()}
    source = get_source(name)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    tables = load_source(name, directory)
    origin = ", ".join(str(directory / f.relpath) for f in source.files)
    return tables, {table: origin for table, _ in tables.items()}


def ingest(
    name: str,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    max_queries: int = 0,
    max_users: int = 0,
    seed: int = 0,
) -> dict:
    """Write the canonical tables of `name` (sampled when asked) to `out_dir`, with a manifest.

    The manifest records the source, the sampling, row counts, and a content hash of the tables written,
    which later steps carry into the registry as the model's data lineage.
    """
    tables, origins = load_tables(name, data_dir)
    tables = sample(tables, max_queries=max_queries, max_users=max_users, seed=seed)
    out_dir = Path(out_dir)
    tables.write(out_dir)
    counts: dict[str, int] = {"products": int(tables.products["product_id"].nunique())}
    if tables.judgments is not None:
        counts["queries"] = int(tables.judgments["query"].nunique())
    if tables.interactions is not None:
        counts["users"] = int(tables.interactions["user_id"].nunique())
    manifest = {
        "source": name,
        "origins": origins,
        "modes": list(tables.modes),
        "sampling": {"max_queries": max_queries, "max_users": max_users, "seed": seed},
        "rows": {table: len(frame) for table, frame in tables.items()},
        "counts": counts,
        "data_hash": tables.content_hash(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest an `ingest` left in `directory`."""
    return json.loads((Path(directory) / MANIFEST).read_text())
