"""Data validation with Great Expectations: one expectation suite per canonical table.

`build_suites` holds the suites as code (versioned by name, e.g. "products.v1"); `validate_tables` runs them
in an ephemeral GX context and returns one `ValidationOutcome` that the command line and the pipeline's
validate component both read. Bad data never raises: every broken expectation becomes a `Failure` that names
the table, the column and a few offending rows.

Referential integrity is prepared in pandas before GX sees a table: a boolean helper column (`isin`
against the referenced ids) expected to be True. GX's own way (`ExpectColumnValuesToBeInSet` with 55k ids)
is slow and puts the whole id list into every result. Every table also gets a row-number helper column, so
that GX reports offending rows by position rather than by index label.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fusionrank.data.contract import EVENT_TYPES, SPECS, Kind, Tables
from fusionrank.errors import ConfigError, DataError

if TYPE_CHECKING:
    import great_expectations as gx

SUITE_VERSION = 1
MAX_EXAMPLES = 5
DEFAULT_MIN_ROWS: dict[str, int] = {
    "products": 10,
    "judgments": 10,
    "interactions": 10,
    "eval_candidates": 10,
}

# The dtype each contract kind has after `contract.conform` (the canonical frames the pipeline passes on).
DTYPES: dict[Kind, str] = {
    "string": "string",
    "float": "float64",
    "int": "int64",
    "timestamp": "datetime64[us, UTC]",
}

# Helper columns added to a copy of each table before validation. The double underscore keeps them apart
# from data columns; a table that already has one is refused rather than silently overwritten.
ROW = "__row"
PRODUCT_KNOWN = "__product_id_in_products"
USER_KNOWN = "__user_id_in_interactions"
HELPERS = (ROW, PRODUCT_KNOWN, USER_KNOWN)

# Expectations that say whether a column can be read at all: when one fails, errors raised by the other
# expectations on that column are consequences, not further findings.
_SCHEMA_TYPES = ("expect_column_to_exist", "expect_column_type_to_be")
# A value with a non-whitespace character: catches empty and whitespace-only text in one expectation.
_NOT_BLANK = r"\S"


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the suites; data, not code, so a pipeline parameter or a YAML file can set them.

    `min_rows` names a minimum row count per table; a table it leaves out keeps its DEFAULT_MIN_ROWS entry.
    `now` is the reference for "not in the future" (timezone-aware); None means the current UTC time when
    `validate_tables` runs.
    """

    relevance_min: float = 1.0  # Home Depot's scale is 1 (irrelevant) to 3 (exact)
    relevance_max: float = 3.0
    min_rows: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIN_ROWS))
    now: datetime | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.relevance_min) and math.isfinite(self.relevance_max)):
            raise ConfigError(
                f"relevance range must be finite, got [{self.relevance_min}, {self.relevance_max}]"
            )
        if self.relevance_min > self.relevance_max:
            raise ConfigError(
                f"relevance_min ({self.relevance_min}) is above relevance_max ({self.relevance_max})"
            )
        unknown = sorted(set(self.min_rows) - set(SPECS))
        if unknown:
            raise ConfigError(f"min_rows names unknown table(s) {unknown}; known tables: {sorted(SPECS)}")
        negative = {t: n for t, n in self.min_rows.items() if not isinstance(n, int) or n < 0}
        if negative:
            raise ConfigError(f"min_rows must be non-negative integers, got {negative}")
        if self.now is not None and self.now.utcoffset() is None:
            raise ConfigError(f"now must be timezone-aware (e.g. datetime.now(UTC)), got {self.now!r}")

    def min_rows_for(self, table: str) -> int:
        """The minimum row count of `table`."""
        return self.min_rows.get(table, DEFAULT_MIN_ROWS[table])


@dataclass
class Failure:
    """One broken expectation: where, which, in words, and at most MAX_EXAMPLES offending rows."""

    table: str
    expectation: str
    column: str | None
    message: str
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationOutcome:
    """The result of validating a dataset: pass/fail, every failure, and what was checked."""

    success: bool
    failures: list[Failure]
    checked: dict[str, int]
    expectations: dict[str, int]
    suites: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable summary: a status line, then one line per failure."""
        tables = ", ".join(
            f"{t} ({self.checked[t]:,} rows, {self.expectations.get(t, 0)} expectations)"
            for t in self.checked
        )
        if self.success:
            return f"validation passed: {tables}"
        lines = [f"validation FAILED with {len(self.failures)} failure(s): {tables}"]
        lines.extend(f"- {f.message}" for f in self.failures)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as JSON-serialisable data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationOutcome:
        """The outcome that `to_dict` (or a JSON file from `write_json`) describes."""
        return cls(
            success=data["success"],
            failures=[Failure(**f) for f in data["failures"]],
            checked=data["checked"],
            expectations=data["expectations"],
            suites=data.get("suites", {}),
        )

    def write_json(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def write_html(self, path: str | Path) -> None:
        """Write a self-contained HTML report (inline CSS, no scripts, no remote resources) to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_render_html(self), encoding="utf-8")


def build_suites(config: ValidationConfig) -> dict[str, gx.ExpectationSuite]:
    """One expectation suite per canonical table, named "<table>.v<SUITE_VERSION>".

    The suites hold every expectation of the contract, optional columns included; `validate_tables` leaves
    out those whose columns a given table does not have. "Not in the future" reads the suite parameter
    `now`, so a suite does not change with the time it was built.
    """
    import great_expectations as gx

    content = _content_expectations(config)
    suites = {}
    for table, spec in SPECS.items():
        expectations: list[gx.expectations.Expectation] = []
        for col in spec.columns:
            if col.required:
                expectations.append(
                    _expect(gx.expectations.ExpectColumnToExist, "required column must be present", col.name)
                )
            expectations.append(
                _expect(
                    gx.expectations.ExpectColumnTypeToBe,
                    f"dtype must be {DTYPES[col.kind]}",
                    col.name,
                    type_=DTYPES[col.kind],
                )
            )
        minimum = config.min_rows_for(table)
        expectations.append(
            _expect(
                gx.expectations.ExpectTableRowCountToBeBetween,
                f"must have at least {minimum} row(s)",
                None,
                min_value=minimum,
            )
        )
        expectations.extend(content[table])
        suites[table] = gx.ExpectationSuite(name=f"{table}.v{SUITE_VERSION}", expectations=expectations)
    return suites


def _content_expectations(config: ValidationConfig) -> dict[str, list[gx.expectations.Expectation]]:
    import great_expectations as gx

    e = gx.expectations

    def not_null(column: str) -> gx.expectations.Expectation:
        return _expect(e.ExpectColumnValuesToNotBeNull, "values must not be null", column)

    def not_blank(column: str) -> gx.expectations.Expectation:
        return _expect(
            e.ExpectColumnValuesToMatchRegex,
            "values must not be empty or whitespace-only",
            column,
            regex=_NOT_BLANK,
        )

    def known(helper: str, column: str, referenced: str) -> gx.expectations.Expectation:
        return _expect(
            e.ExpectColumnValuesToBeInSet,
            f"every value must exist in {referenced}.{column}",
            column,
            helper=helper,
            value_set=[True],
        )

    low, high = config.relevance_min, config.relevance_max
    return {
        "products": [
            not_null("product_id"),
            _expect(e.ExpectColumnValuesToBeUnique, "values must be unique", "product_id"),
            not_null("title"),
            not_blank("title"),
        ],
        "judgments": [
            not_null("query"),
            not_blank("query"),
            not_null("product_id"),
            known(PRODUCT_KNOWN, "product_id", "products"),
            not_null("relevance"),
            _expect(
                e.ExpectColumnValuesToBeBetween,
                f"values must lie in [{low}, {high}]",
                "relevance",
                min_value=low,
                max_value=high,
            ),
        ],
        "interactions": [
            not_null("user_id"),
            not_null("product_id"),
            known(PRODUCT_KNOWN, "product_id", "products"),
            not_null("event_timestamp"),
            _expect(
                e.ExpectColumnValuesToBeBetween,
                "timestamps must not be in the future",
                "event_timestamp",
                max_value={"$PARAMETER": "now"},
            ),
            _expect(
                e.ExpectColumnValuesToBeInSet,
                f"values must be one of {', '.join(EVENT_TYPES)}",
                "event_type",
                value_set=list(EVENT_TYPES),
            ),
        ],
        "eval_candidates": [
            not_null("user_id"),
            not_null("product_id"),
            not_null("protocol"),
            known(PRODUCT_KNOWN, "product_id", "products"),
            known(USER_KNOWN, "user_id", "interactions"),
            _expect(e.ExpectColumnValuesToBeBetween, "values must not be negative", "position", min_value=0),
        ],
    }


def _expect(
    cls: type[gx.expectations.Expectation],
    check: str,
    column: str | None,
    helper: str | None = None,
    **kwargs: Any,
) -> gx.expectations.Expectation:
    # `meta` carries the data column a failure is about (an expectation on a helper column is about the
    # column the helper was computed from) and the check in words, so results need no lookup table.
    target = {"column": helper or column} if column is not None else {}
    return cls(**target, **kwargs, meta={"check": check, "column": column})


def validate_tables(
    tables: Tables,
    config: ValidationConfig = ValidationConfig(),
    sources: dict[str, str] | None = None,
) -> ValidationOutcome:
    """Run each table's suite; return the outcome with every failure.

    `sources` maps a table name to the file it came from, named in failure messages. Raises DataError only
    when validation cannot run (a table that is not a DataFrame, duplicate or reserved column names).
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    present = dict(tables.items())
    for name, frame in present.items():
        _check_runnable(name, frame, (sources or {}).get(name))
    now = config.now or datetime.now(UTC)
    suites = build_suites(config)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    datasource = context.data_sources.add_pandas("fusionrank")

    outcome = ValidationOutcome(success=True, failures=[], checked={}, expectations={})
    for name, frame in present.items():
        work = _with_helpers(name, frame, present)
        runnable = [x for x in suites[name].expectations if _can_run(x, work)]
        suite = context.suites.add(gx.ExpectationSuite(name=suites[name].name, expectations=runnable))
        batch = datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        result = gx.ValidationDefinition(name=suite.name, data=batch, suite=suite).run(
            batch_parameters={"dataframe": work},
            expectation_parameters={"now": now.isoformat()},
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [ROW]},
        )
        where = f"{sources[name]} (table '{name}')" if sources and name in sources else f"table '{name}'"
        # GX returns results grouped by metric; put them back in suite order so reports read the same way.
        order = {x.id: i for i, x in enumerate(suite.expectations)}
        ordered = sorted(result.results, key=lambda r: order[r.expectation_config.id])
        outcome.failures.extend(_failures(name, where, frame, ordered))
        outcome.checked[name] = len(frame)
        outcome.expectations[name] = len(runnable)
        outcome.suites[name] = suite.name
    outcome.success = not outcome.failures
    return outcome


def _check_runnable(name: str, frame: object, source: str | None) -> None:
    where = source or f"table '{name}'"
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{where}: expected a pandas DataFrame, got {type(frame).__name__}")
    duplicated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        raise DataError(f"{where}: duplicate column name(s) {duplicated}; rename them before validating")
    reserved = sorted(set(frame.columns) & set(HELPERS))
    if reserved:
        raise DataError(f"{where}: column name(s) {reserved} are reserved for validation; rename them")


def _with_helpers(name: str, frame: pd.DataFrame, present: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """A copy of `frame` with positional row numbers and the referential-integrity helper columns.

    A helper is left out when a column it needs is missing; the expectation on it is then not run, and the
    missing column is reported by its own table's schema expectation.
    """
    work = frame.reset_index(drop=True)
    helpers: dict[str, Any] = {ROW: np.arange(len(work))}
    references = {PRODUCT_KNOWN: ("product_id", "products"), USER_KNOWN: ("user_id", "interactions")}
    for helper, (column, table) in references.items():
        referenced = present.get(table)
        if name == table or column not in work.columns or referenced is None or column not in referenced:
            continue
        # A null id is not a dangling reference: the not-null expectation reports it once.
        values = work[column]
        helpers[helper] = (
            values.isin(pd.Index(referenced[column].dropna().unique())) | values.isna()
        ).to_numpy(dtype=bool)
    return work.assign(**helpers)


def _can_run(expectation: gx.expectations.Expectation, work: pd.DataFrame) -> bool:
    # A missing required column fails its own existence expectation; the others on it would only raise.
    # A missing optional column (or helper) is simply not there to check.
    column = getattr(expectation, "column", None)
    return (
        expectation.expectation_type == "expect_column_to_exist" or column is None or column in work.columns
    )


def _failures(name: str, where: str, frame: pd.DataFrame, results: list[Any]) -> Iterator[Failure]:
    """The failures among one table's results; `results` come in suite order."""
    unreadable = {
        r.expectation_config.meta["column"]
        for r in results
        if r.expectation_config.type in _SCHEMA_TYPES and not r.success
    }
    for r in results:
        if r.success:
            continue
        config = r.expectation_config
        column, check = config.meta["column"], config.meta["check"]
        error = _exception_message(r.exception_info)
        if error is not None and column in unreadable:
            continue
        subject = f"{where}, column '{column}'" if column else where
        if error is not None:
            message = f"{subject}: the check '{check}' could not run: {error}"
            yield Failure(name, config.type, column, message, [])
        elif config.type == "expect_column_to_exist":
            message = (
                f"{subject}: {check}, but it is missing; the table has {[str(c) for c in frame.columns]}"
            )
            yield Failure(name, config.type, column, message, [])
        elif config.type == "expect_column_type_to_be":
            examples = _wrong_kind_examples(frame[column], config.kwargs["type_"])
            shown = "; offending values: " + _format_examples(examples, column) if examples else ""
            found = r.result.get("observed_value")
            message = f"{subject}: {check} (the data contract's type), found {found}{shown}"
            yield Failure(name, config.type, column, message, examples)
        elif config.type == "expect_table_row_count_to_be_between":
            message = f"{subject}: {check}, found {r.result.get('observed_value')}"
            yield Failure(name, config.type, None, message, [])
        else:
            rows = [int(i[ROW]) for i in r.result.get("partial_unexpected_index_list", [])[:MAX_EXAMPLES]]
            examples = [{"row": row, column: _plain(frame[column].iloc[row])} for row in rows]
            message = (
                f"{subject}: {check}; {r.result['unexpected_count']:,} of "
                f"{r.result['element_count']:,} rows fail: {_format_examples(examples, column)}"
            )
            yield Failure(name, config.type, column, message, examples)


def _exception_message(info: dict[str, Any] | None) -> str | None:
    # GX reports an error either at the top level or keyed by the metric that raised it.
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and (value.get("raised_exception") or value.get("exception_message")):
            return str(value.get("exception_message"))
    return None


def _wrong_kind_examples(values: pd.Series, dtype: str) -> list[dict[str, Any]]:
    """Up to MAX_EXAMPLES rows whose value is not of the Python type that `dtype` holds."""
    kind = next(k for k, d in DTYPES.items() if d == dtype)
    fits = {
        "string": lambda v: isinstance(v, str),
        "float": lambda v: isinstance(v, float | np.floating),
        "int": lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_),
        "timestamp": lambda v: isinstance(v, pd.Timestamp) and v.tzinfo is not None,
    }[kind]
    examples = []
    for row, value in enumerate(values):
        if _is_missing(value) or fits(value):
            continue
        examples.append({"row": row, str(values.name): _plain(value)})
        if len(examples) == MAX_EXAMPLES:
            break
    return examples


def _format_examples(examples: list[dict[str, Any]], column: str) -> str:
    return ", ".join(f"row {e['row']} = {e[column]!r}" for e in examples)


def _is_missing(value: object) -> bool:
    return (
        value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))
    )


def _plain(value: object) -> Any:
    """`value` as a JSON-serialisable Python value (NA -> None, timestamps -> ISO text)."""
    if _is_missing(value):
        return None
    if isinstance(value, pd.Timestamp | datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool):
        return value
    return repr(value)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; }
.pass { color: #1a7f37; } .fail { color: #c62828; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


def _render_html(outcome: ValidationOutcome) -> str:
    esc = html.escape
    status = (
        '<p class="pass">All expectations passed.</p>'
        if outcome.success
        else f'<p class="fail">{len(outcome.failures)} failure(s).</p>'
    )
    tables = "".join(
        f"<tr><td>{esc(t)}</td><td>{esc(outcome.suites.get(t, ''))}</td><td>{n:,}</td>"
        f"<td>{outcome.expectations.get(t, 0)}</td>"
        f"<td>{sum(f.table == t for f in outcome.failures)}</td></tr>"
        for t, n in outcome.checked.items()
    )
    failures = "".join(
        f"<tr><td>{esc(f.table)}</td><td>{esc(f.column or '(table)')}</td>"
        f"<td><code>{esc(f.expectation)}</code></td><td>{esc(f.message)}</td>"
        f"<td><code>{esc(json.dumps(f.examples))}</code></td></tr>"
        for f in outcome.failures
    )
    failure_table = (
        "<h2>Failures</h2><table><tr><th>table</th><th>column</th><th>expectation</th><th>message</th>"
        f"<th>examples (row: value)</th></tr>{failures}</table>"
        if outcome.failures
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>fusionrank data validation</title><style>{_STYLE}</style></head><body>"
        f"<h1>Data validation</h1>{status}"
        "<h2>Tables</h2><table><tr><th>table</th><th>suite</th><th>rows</th><th>expectations</th>"
        f"<th>failures</th></tr>{tables}</table>{failure_table}</body></html>\n"
    )
