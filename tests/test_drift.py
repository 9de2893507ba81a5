"""Evidently drift on real Home Depot data: an unshifted sample passes, a deliberately shifted copy drifts
and the gate rejects it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.drift import DriftResult, compute_drift
from fusionrank.errors import ConfigError, DataError
from fusionrank.gate import GateConfig, decide

# Evidently pulls in litestar, whose deprecation warnings the project-wide message filter does not match.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:litestar.*")

FEATURES = ["f_title_tokens", "f_title_chars", "f_judgments"]
SAMPLE = 3000


@pytest.fixture(scope="module")
def products(data_dir: Path) -> pd.DataFrame:
    """One row per judged Home Depot product: title length in tokens and characters, how many queries
    judged it (its popularity in the data), and its mean relevance standing in for a model score."""
    from fusionrank.data.sources import load_source

    tables = load_source("homedepot", data_dir)
    judgments = tables.judgments.groupby("product_id")["relevance"].agg(["size", "mean"])
    frame = tables.products.set_index("product_id").join(judgments, how="inner")
    titles = frame["title"].astype(str)
    out = pd.DataFrame(
        {
            "f_title_tokens": titles.str.split().str.len().astype(float),
            "f_title_chars": titles.str.len().astype(float),
            "f_judgments": frame["size"].astype(float),
            "score": frame["mean"].astype(float),
        }
    ).reset_index(drop=True)
    return out.sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(products: pd.DataFrame) -> pd.DataFrame:
    return products.iloc[:SAMPLE]


@pytest.fixture(scope="module")
def unshifted(products: pd.DataFrame, reference: pd.DataFrame, tmp_path_factory) -> DriftResult:
    html = tmp_path_factory.mktemp("drift") / "drift.html"
    return compute_drift(reference, products.iloc[SAMPLE : 2 * SAMPLE], FEATURES, html_path=html)


@pytest.fixture(scope="module")
def shifted(products: pd.DataFrame, reference: pd.DataFrame) -> DriftResult:
    current = products.iloc[SAMPLE : 2 * SAMPLE].copy()
    current["f_title_tokens"] = current["f_title_tokens"] * 1.5
    current["f_title_chars"] = current["f_title_chars"] + 20.0
    current["score"] = current["score"] - 0.3
    return compute_drift(reference, current, FEATURES)


def test_an_unshifted_sample_does_not_drift(unshifted: DriftResult) -> None:
    assert unshifted.drift_share == 0.0
    assert unshifted.drifted_columns == []
    assert not unshifted.prediction_drift
    assert all(v["score"] < 0.1 for v in unshifted.per_column.values())
    assert (unshifted.n_reference, unshifted.n_current) == (SAMPLE, SAMPLE)


def test_a_shifted_copy_drifts_past_the_threshold(shifted: DriftResult) -> None:
    assert shifted.drifted_columns == ["f_title_tokens", "f_title_chars"]
    assert shifted.drift_share == pytest.approx(2 / 3)
    assert shifted.dataset_drift
    assert shifted.prediction_drift
    assert shifted.prediction_score > 0.1
    assert not shifted.per_column["f_judgments"]["drifted"]


def test_the_gate_rejects_the_shifted_copy_and_passes_the_unshifted(
    unshifted: DriftResult, shifted: DriftResult
) -> None:
    config = GateConfig(floors={"ndcg@10": 0.5}, max_drift_share=0.5)
    metrics = {"ndcg@10": 0.8}
    rejected = decide(metrics, {"ndcg@10": 0.79}, shifted.to_dict(), config)
    assert not rejected.approved
    assert [c["name"] for c in rejected.checks if not c["passed"]] == ["drift"]
    assert "f_title_tokens" in rejected.reasons[0]
    assert decide(metrics, {"ndcg@10": 0.79}, unshifted, config).approved


def test_the_method_is_fixed_whatever_the_sample_size(products: pd.DataFrame) -> None:
    # Evidently's defaults switch to p-value tests below ~1,000 rows; the explicit method must not
    small = compute_drift(products.iloc[:500], products.iloc[500:1000], FEATURES)
    for column in FEATURES:
        assert small.per_column[column]["method"] == "wasserstein"
        assert small.per_column[column]["threshold"] == 0.1


def test_the_html_report_is_written(unshifted: DriftResult) -> None:
    path = Path(unshifted.html_path)
    assert path.is_file()
    assert path.read_text(errors="replace").lstrip().lower().startswith("<!doctype html")


def test_an_empty_feature_counts_as_drifted(reference: pd.DataFrame, products: pd.DataFrame) -> None:
    current = products.iloc[SAMPLE : 2 * SAMPLE].assign(f_judgments=np.nan)
    result = compute_drift(reference, current, FEATURES, score_column=None)
    assert result.drifted_columns == ["f_judgments"]
    assert result.empty_columns == ["f_judgments"]
    assert result.per_column["f_judgments"]["score"] is None
    assert not result.prediction_drift


def test_the_result_round_trips_through_a_dict(shifted: DriftResult) -> None:
    assert DriftResult.from_dict(shifted.to_dict()) == shifted


def test_bad_inputs_name_the_problem(reference: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="lacks column"):
        compute_drift(reference, reference.drop(columns=["f_judgments"]), FEATURES)
    with pytest.raises(ConfigError, match="also listed"):
        compute_drift(reference, reference, [*FEATURES, "score"])
    with pytest.raises(ConfigError, match="at least one"):
        compute_drift(reference, reference, [])
