"""The canonical tables every adapter produces and every later step reads (see ARCHITECTURE.md).

A dataset is `products` plus at least one of `interactions` (recommendation) and `judgments` (search).
`eval_candidates` is optional: the fixed candidate lists of a published protocol (for example LLMRank's
20 candidates per user on Amazon Games), kept so that our figures can stand beside the published ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import pandas as pd

from fusionrank.errors import DataError

Kind = Literal["string", "float", "int", "timestamp"]
Mode = Literal["search", "recommendation"]


@dataclass(frozen=True)
class Column:
    """One column of a canonical table: its name, its kind and whether a table may omit it."""

    name: str
    kind: Kind
    required: bool = True


@dataclass(frozen=True)
class TableSpec:
    """The columns of one canonical table, in the order they are written."""

    name: str
    columns: tuple[Column, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


PRODUCTS = TableSpec(
    "products",
    (
        Column("product_id", "string"),
        Column("title", "string"),
        Column("description", "string", required=False),
        Column("category", "string", required=False),
        Column("brand", "string", required=False),
        Column("price", "float", required=False),
    ),
)
INTERACTIONS = TableSpec(
    "interactions",
    (
        Column("user_id", "string"),
        Column("product_id", "string"),
        Column("event_timestamp", "timestamp"),
        Column("event_type", "string", required=False),
    ),
)
JUDGMENTS = TableSpec(
    "judgments",
    (
        Column("query", "string"),
        Column("product_id", "string"),
        Column("relevance", "float"),
    ),
)
EVAL_CANDIDATES = TableSpec(
    "eval_candidates",
    (
        Column("user_id", "string"),
        Column("product_id", "string"),
        Column("position", "int"),
        Column("protocol", "string"),
    ),
)
SPECS: dict[str, TableSpec] = {s.name: s for s in (PRODUCTS, INTERACTIONS, JUDGMENTS, EVAL_CANDIDATES)}
EVENT_TYPES = ("view", "click", "cart", "purchase")


def conform(df: pd.DataFrame, spec: TableSpec, source: str) -> pd.DataFrame:
    """Return `df` with the spec's columns in order and canonical dtypes.

    Raises DataError naming `source` when a required column is missing or a column cannot hold its kind.
    Values are not judged here (empty titles, out-of-range relevance, ...): that is validation's job, and
    validation reports every offending row rather than the first.
    """
    missing = [c for c in spec.required if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: table '{spec.name}' lacks required column(s) {missing}; it has {list(df.columns)}"
        )
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for col in spec.columns:
        if col.name not in df.columns:
            continue
        values = df[col.name].reset_index(drop=True)
        try:
            out[col.name] = _as_kind(values, col.kind)
        except (TypeError, ValueError) as exc:
            bad = _first_bad_values(values, col.kind)
            raise DataError(
                f"{source}: column '{col.name}' of table '{spec.name}' must be {col.kind}; "
                f"offending values (row: value): {bad}"
            ) from exc
    return out


def _as_kind(values: pd.Series, kind: Kind) -> pd.Series:
    if kind == "string":
        if pd.api.types.is_float_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise TypeError("a string column must not hold floats or booleans")
        return values.astype("string")
    if kind == "float":
        if not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
            raise TypeError("not numeric")
        return values.astype("float64")
    if kind == "int":
        if not pd.api.types.is_integer_dtype(values):
            raise TypeError("not integer")
        return values.astype("int64")
    if pd.api.types.is_string_dtype(values) or pd.api.types.is_object_dtype(values):
        raise TypeError("timestamps must be a datetime column, not text")
    converted = pd.to_datetime(values, utc=True)
    return converted.astype("datetime64[us, UTC]")


def _first_bad_values(values: pd.Series, kind: Kind, limit: int = 5) -> dict[int, object]:
    if kind == "float":
        bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
    elif kind == "int":
        bad = ~values.map(lambda v: isinstance(v, int))
    elif kind == "timestamp":
        bad = values.notna()
    else:
        bad = values.map(lambda v: not (v is None or isinstance(v, str)))
    return {int(i): values[i] for i in values.index[bad][:limit]}


@dataclass
class Tables:
    """A dataset in canonical form."""

    products: pd.DataFrame
    interactions: pd.DataFrame | None = None
    judgments: pd.DataFrame | None = None
    eval_candidates: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        if self.interactions is None and self.judgments is None:
            raise DataError("a dataset needs 'products' and at least one of 'interactions' and 'judgments'")

    @property
    def modes(self) -> tuple[Mode, ...]:
        """The ranking modes this dataset supports."""
        found: list[Mode] = []
        if self.judgments is not None:
            found.append("search")
        if self.interactions is not None:
            found.append("recommendation")
        return tuple(found)

    def items(self) -> Iterator[tuple[str, pd.DataFrame]]:
        """The tables present, by name."""
        for f in fields(self):
            table = getattr(self, f.name)
            if table is not None:
                yield f.name, table

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write each table as `<name>.parquet` under `directory`; return the paths by table name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, table in self.items():
            path = directory / f"{name}.parquet"
            tmp = path.with_suffix(".parquet.tmp")
            table.to_parquet(tmp, index=False)
            tmp.replace(path)
            paths[name] = path
        return paths

    @classmethod
    def read(cls, directory: str | Path, conform_types: bool = True) -> Tables:
        """Read the tables a `write` left in `directory` (or a user's own canonical parquet files)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"{directory}: no such dataset directory")
        loaded: dict[str, pd.DataFrame] = {}
        for name, spec in SPECS.items():
            path = directory / f"{name}.parquet"
            if not path.exists():
                continue
            try:
                df = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for a corrupt file
                raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
            loaded[name] = conform(df, spec, str(path)) if conform_types else df
        if "products" not in loaded:
            raise DataError(f"{directory}: missing products.parquet (every dataset needs a products table)")
        return cls(**loaded)

    def content_hash(self) -> str:
        """A SHA-256 over every table's content (order-sensitive), for lineage tags."""
        digest = hashlib.sha256()
        for name, table in self.items():
            digest.update(name.encode())
            digest.update(",".join(table.columns).encode())
            digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
        return digest.hexdigest()
