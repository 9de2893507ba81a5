"""Data drift of the features and prediction drift of the fused score, measured by Evidently 0.7.

Reference: the data the champion was trained on; current: this run's data. The method and threshold are
set explicitly (Evidently's defaults switch between distance and p-value tests with the sample size), so
the share the gate reads means the same at every sample size. Results are read from Evidently's snapshot
by metric type and column name, never by list position.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusionrank.errors import ConfigError, DataError

DRIFTED_COUNT_TYPE = "evidently:metric_v2:DriftedColumnsCount"
VALUE_DRIFT_TYPE = "evidently:metric_v2:ValueDrift"
FAILED = "FAIL"


@dataclass
class DriftResult:
    """What the gate reads: the share of drifted feature columns and whether the fused score drifted.

    `per_column[column]` holds `method`, `threshold`, `score` (None when the column could not be tested)
    and `drifted`. A column that is empty (all missing) in either dataset cannot be tested and counts as
    drifted: a feature that vanished is a data problem the gate must see.
    """

    drift_share: float
    drifted_columns: list[str]
    per_column: dict[str, dict]
    prediction_drift: bool
    prediction_score: float | None = None
    score_column: str | None = None
    method: str = "wasserstein"
    threshold: float = 0.1
    max_share: float = 0.5
    dataset_drift: bool = False
    n_reference: int = 0
    n_current: int = 0
    html_path: str | None = None
    empty_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftResult:
        """Rebuild a result written by `to_dict`."""
        return cls(**dict(data))


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: Sequence[str],
    score_column: str | None = "score",
    html_path: str | Path | None = None,
    num_method: str = "wasserstein",
    threshold: float = 0.1,
    max_share: float = 0.5,
) -> DriftResult:
    """Evidently data drift of `columns` and value drift of `score_column` between two frames.

    `num_method`/`threshold` apply to every column (Wasserstein distance normed by the reference's
    standard deviation, drift at >= 0.1, by default). `max_share` is Evidently's dataset-drift share,
    reported as `dataset_drift`; the gate applies its own maximum to `drift_share`. `score_column=None`
    skips prediction drift. With `html_path`, Evidently's HTML report is written there.
    """
    columns = list(columns)
    if not columns:
        raise ConfigError("drift needs at least one feature column")
    if not 0.0 < max_share <= 1.0:
        raise ConfigError(f"max_share must be in (0, 1], got {max_share!r}")
    if score_column in columns:
        raise ConfigError(f"score column {score_column!r} is also listed among the feature columns")
    wanted = [*columns, *([score_column] if score_column else [])]
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise DataError(f"{name} data lacks column(s) {missing} needed for drift")
        if len(frame) == 0:
            raise DataError(f"{name} data is empty: drift cannot be measured")
        not_numeric = [c for c in wanted if not pd.api.types.is_numeric_dtype(frame[c])]
        if not_numeric:
            raise DataError(f"{name} data: drift columns must be numeric, {not_numeric} are not")
    empty = [c for c in wanted if reference[c].isna().all() or current[c].isna().all()]
    tested = [c for c in columns if c not in empty]
    score_tested = bool(score_column) and score_column not in empty

    snapshot = _run_report(
        reference[[*tested, *([score_column] if score_tested else [])]],
        current[[*tested, *([score_column] if score_tested else [])]],
        tested,
        score_column if score_tested else None,
        num_method,
        threshold,
        max_share,
    )
    per_column: dict[str, dict] = {
        c: {"method": num_method, "threshold": threshold, "score": None, "drifted": True} for c in empty
    }
    dataset_drift = bool(empty)
    if snapshot is not None:
        if html_path is not None:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            snapshot.save_html(str(html_path))
        values, statuses = _read_snapshot(snapshot.dict())
        for column, (config, score) in values.items():
            per_column[column] = {
                "method": config.get("method"),
                "threshold": config.get("threshold"),
                "score": score,
                "drifted": statuses.get(column) == FAILED,
            }
        dataset_drift = dataset_drift or statuses.get(DRIFTED_COUNT_TYPE) == FAILED
    drifted = [c for c in columns if per_column[c]["drifted"]]
    prediction = per_column.pop(score_column, None) if score_column else None
    return DriftResult(
        drift_share=len(drifted) / len(columns),
        drifted_columns=drifted,
        per_column={c: per_column[c] for c in columns},
        prediction_drift=bool(prediction and prediction["drifted"]),
        prediction_score=None if prediction is None else prediction["score"],
        score_column=score_column,
        method=num_method,
        threshold=threshold,
        max_share=max_share,
        dataset_drift=dataset_drift,
        n_reference=len(reference),
        n_current=len(current),
        html_path=None if html_path is None or snapshot is None else str(html_path),
        empty_columns=empty,
    )


def _run_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str],
    score_column: str | None,
    num_method: str,
    threshold: float,
    max_share: float,
) -> Any:
    """Evidently's snapshot, or None when no column is left to test."""
    if not columns and score_column is None:
        return None
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=[*columns, *([score_column] if score_column else [])])
    metrics: list[Any] = []
    if columns:
        metrics.append(
            DataDriftPreset(
                columns=columns,
                num_method=num_method,
                threshold=threshold,
                drift_share=max_share,
            )
        )
    if score_column:
        metrics.append(ValueDrift(column=score_column, method=num_method, threshold=threshold))
    report = Report(metrics, include_tests=True)
    # Evidently's correlation widgets divide by a zero deviation on constant columns; the drift figures
    # are unaffected, so the warnings are noise here
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return report.run(
                current_data=Dataset.from_pandas(current.reset_index(drop=True), definition),
                reference_data=Dataset.from_pandas(reference.reset_index(drop=True), definition),
            )
        except ValueError as exc:
            raise DataError(f"Evidently could not compute drift: {exc}") from exc


def _read_snapshot(data: Mapping[str, Any]) -> tuple[dict[str, tuple[dict, float | None]], dict[str, str]]:
    """Per-column (metric config, drift score) and test statuses keyed by column name (or, for the
    drifted-share test, by its metric type)."""
    by_id: dict[str, str] = {}
    values: dict[str, tuple[dict, float | None]] = {}
    for metric in data.get("metrics", []):
        config = metric.get("config", {})
        kind = config.get("type")
        if kind == VALUE_DRIFT_TYPE:
            column = config["column"]
            value = metric.get("value")
            values[column] = (config, None if value is None else float(value))
            by_id[metric["id"]] = column
        elif kind == DRIFTED_COUNT_TYPE:
            by_id[metric["id"]] = DRIFTED_COUNT_TYPE
    statuses: dict[str, str] = {}
    for test in data.get("tests", []):
        key = by_id.get(test.get("metric_config", {}).get("metric_id"))
        if key is not None:
            # one failing test on a metric is enough to call it drifted
            statuses[key] = FAILED if FAILED in (test.get("status"), statuses.get(key)) else test["status"]
    missing = [c for c in values if c not in statuses]
    if missing:
        raise DataError(f"Evidently's report has no drift test for column(s) {missing}")
    return values, statuses
