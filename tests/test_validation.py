"""Data validation: the suites pass the real datasets and catch each kind of bad input on tiny frames."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pandas as pd
import pytest

from fusionrank.data.contract import (
    EVAL_CANDIDATES,
    INTERACTIONS,
    JUDGMENTS,
    PRODUCTS,
    SPECS,
    Tables,
    conform,
)
from fusionrank.data.sources import default_data_dir, load_source
from fusionrank.errors import ConfigError, DataError
from fusionrank.validation import (
    Failure,
    ValidationConfig,
    ValidationOutcome,
    build_suites,
    validate_tables,
)

NOW = datetime(2024, 1, 1, tzinfo=UTC)
TINY = ValidationConfig(min_rows=dict.fromkeys(SPECS, 1), now=NOW)


def products(**overrides: list) -> pd.DataFrame:
    data = {"product_id": ["p1", "p2", "p3"], "title": ["drill", "hammer", "saw"]} | overrides
    return conform(pd.DataFrame(data), PRODUCTS, "test")


def judgments(**overrides: list) -> pd.DataFrame:
    data = {"query": ["cordless drill", "hammer", "saw"], "product_id": ["p1", "p2", "p3"]}
    data |= {"relevance": [3.0, 2.33, 1.0]} | overrides
    return conform(pd.DataFrame(data), JUDGMENTS, "test")


def interactions(**overrides: list) -> pd.DataFrame:
    data = {
        "user_id": ["u1", "u1", "u2"],
        "product_id": ["p1", "p2", "p3"],
        "event_timestamp": pd.to_datetime(["2023-01-01", "2023-01-02", "2023-01-03"], utc=True),
        "event_type": ["view", "purchase", "click"],
    } | overrides
    return conform(pd.DataFrame(data), INTERACTIONS, "test")


def eval_candidates(**overrides: list) -> pd.DataFrame:
    data = {"user_id": ["u1", "u1"], "product_id": ["p2", "p3"], "position": [0, 1], "protocol": ["t", "t"]}
    return conform(pd.DataFrame(data | overrides), EVAL_CANDIDATES, "test")


def tables(**overrides: pd.DataFrame) -> Tables:
    parts = {
        "products": products(),
        "judgments": judgments(),
        "interactions": interactions(),
        "eval_candidates": eval_candidates(),
    }
    return Tables(**(parts | overrides))


def only_failure(outcome: ValidationOutcome, table: str, column: str | None) -> Failure:
    """The single failure of the outcome, checked to name `table` and `column` in its fields and message."""
    assert not outcome.success
    assert len(outcome.failures) == 1, outcome.summary()
    failure = outcome.failures[0]
    assert (failure.table, failure.column) == (table, column)
    assert f"table '{table}'" in failure.message
    if column is not None:
        assert f"column '{column}'" in failure.message
    return failure


def test_valid_tiny_dataset_passes() -> None:
    outcome = validate_tables(tables(), TINY)
    assert outcome.success, outcome.summary()
    assert outcome.failures == []
    assert outcome.checked == {"products": 3, "interactions": 3, "judgments": 3, "eval_candidates": 2}
    assert set(outcome.expectations) == set(outcome.checked)
    assert all(n > 5 for n in outcome.expectations.values())
    assert outcome.suites["products"] == "products.v1"
    assert outcome.summary().startswith("validation passed")


def test_suites_are_versioned_and_built_from_config() -> None:
    config = ValidationConfig(relevance_min=0.0, relevance_max=4.0, min_rows={"products": 7})
    suites = build_suites(config)
    assert {t: s.name for t, s in suites.items()} == {
        "products": "products.v1",
        "interactions": "interactions.v1",
        "judgments": "judgments.v1",
        "eval_candidates": "eval_candidates.v1",
    }
    kwargs = [e.configuration.kwargs for e in suites["judgments"].expectations]
    assert {"column": "relevance", "min_value": 0.0, "max_value": 4.0} in kwargs
    row_count = "expect_table_row_count_to_be_between"
    minimum = {
        t: [e.min_value for e in s.expectations if e.expectation_type == row_count] for t, s in suites.items()
    }
    # a table that min_rows does not name keeps its default
    assert minimum == {"products": [7], "interactions": [10], "judgments": [10], "eval_candidates": [10]}
    # "now" is a suite parameter, so building twice gives the same suites
    assert build_suites(config)["interactions"].to_json_dict() == suites["interactions"].to_json_dict()


def test_duplicate_product_id() -> None:
    catalog = products(product_id=["p1", "p2", "p3", "p2"], title=["drill", "hammer", "saw", "hammer v2"])
    failure = only_failure(validate_tables(tables(products=catalog), TINY), "products", "product_id")
    assert failure.expectation == "expect_column_values_to_be_unique"
    assert failure.examples == [{"row": 1, "product_id": "p2"}, {"row": 3, "product_id": "p2"}]
    assert "row 3 = 'p2'" in failure.message


@pytest.mark.parametrize("title", ["", "  \t"])
def test_empty_or_whitespace_title(title: str) -> None:
    outcome = validate_tables(tables(products=products(title=["drill", title, "saw"])), TINY)
    failure = only_failure(outcome, "products", "title")
    assert failure.examples == [{"row": 1, "title": title}]
    assert f"row 1 = {title!r}" in failure.message


def test_null_title() -> None:
    outcome = validate_tables(tables(products=products(title=["drill", None, "saw"])), TINY)
    failure = only_failure(outcome, "products", "title")
    assert failure.expectation == "expect_column_values_to_not_be_null"
    assert failure.examples == [{"row": 1, "title": None}]


def test_relevance_out_of_range() -> None:
    outcome = validate_tables(tables(judgments=judgments(relevance=[3.0, 3.5, 0.0])), TINY)
    failure = only_failure(outcome, "judgments", "relevance")
    assert failure.examples == [{"row": 1, "relevance": 3.5}, {"row": 2, "relevance": 0.0}]
    assert "[1.0, 3.0]" in failure.message
    assert "2 of 3 rows" in failure.message


def test_relevance_range_comes_from_config() -> None:
    config = ValidationConfig(relevance_min=0.0, relevance_max=4.0, min_rows=TINY.min_rows, now=NOW)
    assert validate_tables(tables(judgments=judgments(relevance=[3.0, 3.5, 0.0])), config).success


def test_judgment_names_unknown_product() -> None:
    outcome = validate_tables(
        tables(judgments=judgments(product_id=["p1", "p404", "p3"])),
        TINY,
        sources={"judgments": "/data/run/judgments.parquet"},
    )
    failure = only_failure(outcome, "judgments", "product_id")
    assert failure.expectation == "expect_column_values_to_be_in_set"
    assert failure.examples == [{"row": 1, "product_id": "p404"}]
    assert failure.message.startswith("/data/run/judgments.parquet (table 'judgments')")
    assert "products.product_id" in failure.message


def test_null_product_id_is_reported_once_as_null_not_as_unknown() -> None:
    outcome = validate_tables(tables(judgments=judgments(product_id=["p1", None, "p3"])), TINY)
    failure = only_failure(outcome, "judgments", "product_id")
    assert failure.expectation == "expect_column_values_to_not_be_null"
    assert failure.examples == [{"row": 1, "product_id": None}]


def test_interaction_names_unknown_product() -> None:
    outcome = validate_tables(tables(interactions=interactions(product_id=["p1", "p2", "gone"])), TINY)
    failure = only_failure(outcome, "interactions", "product_id")
    assert failure.examples == [{"row": 2, "product_id": "gone"}]


def test_eval_candidate_names_unknown_product_and_user() -> None:
    bad = eval_candidates(user_id=["u1", "stranger"], product_id=["gone", "p3"])
    outcome = validate_tables(tables(eval_candidates=bad), TINY)
    assert not outcome.success
    found = {(f.table, f.column): f.examples for f in outcome.failures}
    assert found == {
        ("eval_candidates", "product_id"): [{"row": 0, "product_id": "gone"}],
        ("eval_candidates", "user_id"): [{"row": 1, "user_id": "stranger"}],
    }


def test_timestamp_in_the_future() -> None:
    stamps = pd.to_datetime(["2023-01-01", "2024-06-01", "2023-01-03"], utc=True)
    outcome = validate_tables(tables(interactions=interactions(event_timestamp=stamps)), TINY)
    failure = only_failure(outcome, "interactions", "event_timestamp")
    assert failure.examples == [{"row": 1, "event_timestamp": "2024-06-01T00:00:00+00:00"}]
    assert "future" in failure.message
    # the same data is fine once "now" is later
    later = ValidationConfig(min_rows=TINY.min_rows, now=datetime(2025, 1, 1, tzinfo=UTC))
    assert validate_tables(tables(interactions=interactions(event_timestamp=stamps)), later).success


def test_unknown_event_type() -> None:
    outcome = validate_tables(tables(interactions=interactions(event_type=["view", "like", "click"])), TINY)
    failure = only_failure(outcome, "interactions", "event_type")
    assert failure.examples == [{"row": 1, "event_type": "like"}]


def test_event_type_is_optional() -> None:
    outcome = validate_tables(tables(interactions=interactions().drop(columns="event_type")), TINY)
    assert outcome.success, outcome.summary()


def test_missing_column_is_a_failure_not_a_crash() -> None:
    frame = judgments().drop(columns="relevance")
    outcome = validate_tables(tables(judgments=frame), TINY, sources={"judgments": "judgments.parquet"})
    failure = only_failure(outcome, "judgments", "relevance")
    assert failure.expectation == "expect_column_to_exist"
    assert "missing" in failure.message
    assert "['query', 'product_id']" in failure.message


def test_missing_referenced_column_skips_the_reference_check() -> None:
    outcome = validate_tables(tables(products=products().drop(columns="product_id")), TINY)
    only_failure(outcome, "products", "product_id")


def test_relevance_as_text_is_a_type_failure() -> None:
    frame = pd.DataFrame(
        {
            "query": pd.array(["drill", "saw"], dtype="string"),
            "product_id": pd.array(["p1", "p3"], dtype="string"),
            "relevance": ["3", "high"],
        }
    )
    outcome = validate_tables(tables(judgments=frame), TINY)
    # the range check cannot compare text with numbers; that error is a consequence, not a second finding
    failure = only_failure(outcome, "judgments", "relevance")
    assert failure.expectation == "expect_column_type_to_be"
    assert "float64" in failure.message
    assert "found object" in failure.message
    assert failure.examples == [{"row": 0, "relevance": "3"}, {"row": 1, "relevance": "high"}]


def test_row_count_below_minimum() -> None:
    config = ValidationConfig(min_rows=TINY.min_rows | {"judgments": 5}, now=NOW)
    failure = only_failure(validate_tables(tables(), config), "judgments", None)
    assert failure.expectation == "expect_table_row_count_to_be_between"
    assert "at least 5 row(s), found 3" in failure.message


def test_every_failure_is_reported_in_one_run() -> None:
    bad = Tables(
        products=products(product_id=["p1", "p1", "p3"], title=["", "hammer", "saw"]),
        judgments=judgments(relevance=[9.0, 2.0, 1.0], product_id=["p1", "p9", "p3"]),
    )
    outcome = validate_tables(bad, TINY)
    assert {(f.table, f.column) for f in outcome.failures} == {
        ("products", "product_id"),
        ("products", "title"),
        ("judgments", "relevance"),
        ("judgments", "product_id"),
    }
    lines = outcome.summary().splitlines()
    assert lines[0].startswith("validation FAILED with 4 failure(s)")
    assert len(lines) == 5
    assert all("table '" in line and "row " in line for line in lines[1:])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"relevance_min": 3.0, "relevance_max": 1.0},
        {"relevance_max": float("nan")},
        {"min_rows": {"orders": 1}},
        {"min_rows": {"products": -1}},
        {"now": datetime(2024, 1, 1)},
    ],
)
def test_config_rejects_values_that_cannot_work(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ValidationConfig(**kwargs)


def test_cannot_run_raises_data_error() -> None:
    with pytest.raises(DataError, match="reserved"):
        validate_tables(tables(products=products().assign(__row=0)), TINY)
    with pytest.raises(DataError, match="DataFrame"):
        validate_tables(Tables(products=[1, 2], judgments=judgments()), TINY)


def test_reports_are_written_offline_and_json_round_trips(tmp_path) -> None:
    outcome = validate_tables(tables(judgments=judgments(product_id=["p1", "p2", "p404"])), TINY)
    outcome.write_json(tmp_path / "out" / "validation.json")
    outcome.write_html(tmp_path / "out" / "validation.html")

    data = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert data == outcome.to_dict()
    assert data["success"] is False
    assert ValidationOutcome.from_dict(data) == outcome

    page = (tmp_path / "out" / "validation.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert "judgments" in page
    assert "p404" in page


REAL_DATA = pytest.mark.skipif(
    not (default_data_dir() / "homedepot").is_dir(),
    reason=f"real data not found under {default_data_dir()} (set FUSIONRANK_DATA_DIR)",
)


@REAL_DATA
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("homedepot", {"products": 54_667, "judgments": 74_067}),
        ("amazon-games", {"products": 16_859, "interactions": 440_264, "eval_candidates": 620_000}),
    ],
)
def test_real_datasets_pass(source: str, expected: dict[str, int]) -> None:
    data = load_source(source)
    start = time.perf_counter()
    outcome = validate_tables(data)
    elapsed = time.perf_counter() - start
    print(f"{source}: validate_tables {elapsed:.2f} s; {outcome.summary()}")
    assert outcome.success, outcome.summary()
    assert outcome.checked == expected
