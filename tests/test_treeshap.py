"""The precomputed TreeSHAP tables give LightGBM's own TreeSHAP values, missing values and zeros included."""

from __future__ import annotations

import lightgbm
import numpy as np
import pandas as pd
import pytest

from fusionrank.errors import DataError
from fusionrank.treeshap import TreeShapTables


def _booster(rows: int = 3000, seed: int = 0, **params: object) -> tuple[lightgbm.Booster, np.ndarray]:
    """A lambdarank model over 6 features: one with missing values (NaN splits), one mostly zero, one
    constant-ish, trees deep enough to repeat a feature on a path."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    x[rng.random(rows) < 0.3, 1] = np.nan
    x[rng.random(rows) < 0.6, 2] = 0.0
    x[:, 5] = np.round(x[:, 5])
    signal = x[:, 0] + np.nan_to_num(x[:, 1], nan=-1.0) * 0.5 + np.sin(3 * x[:, 3]) + (x[:, 2] > 0)
    label = np.digitize(signal + rng.normal(scale=0.3, size=rows), [0.0, 1.0, 2.0])
    settings = {
        "objective": "lambdarank",
        "num_leaves": 31,
        "min_data_in_leaf": 5,
        "learning_rate": 0.1,
        "verbose": -1,
        "seed": seed,
        **params,
    }
    data = lightgbm.Dataset(x, label=label, group=[20] * (rows // 20))
    return lightgbm.train(settings, data, num_boost_round=40), x


@pytest.mark.parametrize("params", [{}, {"zero_as_missing": True}, {"use_missing": False}])
def test_the_tables_give_lightgbms_own_values(params: dict[str, object]) -> None:
    booster, x = _booster(**params)
    tables = TreeShapTables.from_booster(booster)
    rng = np.random.default_rng(1)
    probe = np.vstack([x[:300], rng.normal(scale=3, size=(200, 6))])
    probe[rng.random(probe.shape) < 0.1] = np.nan  # missing where training had none, too
    probe[rng.random(probe.shape) < 0.1] = 0.0
    expected = booster.predict(probe, pred_contrib=True)
    got = tables.contributions(probe)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=1), booster.predict(probe, raw_score=True), rtol=0, atol=1e-9)


def test_a_row_has_the_same_values_alone_as_in_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionrank import treeshap

    booster, x = _booster(rows=1200)
    tables = TreeShapTables.from_booster(booster)
    rows = x[:300]
    monkeypatch.setattr(treeshap, "CHUNK_ROWS", 64)  # five calls, the last one short
    together = tables.contributions(rows)
    np.testing.assert_allclose(together, booster.predict(rows, pred_contrib=True), rtol=0, atol=1e-9)
    alone = np.vstack([tables.contributions(rows[i : i + 1]) for i in (0, 150, 299)])
    np.testing.assert_allclose(together[[0, 150, 299]], alone, rtol=0, atol=1e-12)
    assert tables.contributions(np.zeros((0, 6))).shape == (0, 7)
    # a column slice (not contiguous) reads as the same values
    wide = np.hstack([rows, rows])
    np.testing.assert_allclose(tables.contributions(wide[:, :6]), together, rtol=0, atol=1e-12)
    with pytest.raises(DataError, match="rows of 6 features"):
        tables.contributions(np.zeros((2, 5)))
    # one compiled call per chunk that lets the server's event loop run beside it (the point of the module)
    assert treeshap._kernel().targetoptions["nogil"] is True


def test_a_model_of_constant_trees_is_all_bias() -> None:
    x = np.random.default_rng(0).normal(size=(40, 3))
    data = lightgbm.Dataset(x, label=np.zeros(40), group=[20, 20])
    booster = lightgbm.train({"objective": "lambdarank", "verbose": -1}, data, num_boost_round=2)
    tables = TreeShapTables.from_booster(booster)
    assert len(tables.slot_feature) == 0  # no tree has a split
    np.testing.assert_allclose(
        tables.contributions(x[:4]), booster.predict(x[:4], pred_contrib=True), atol=1e-12
    )


def test_the_lambdamart_fusion_explains_with_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionrank.fusion import fit_lambdamart, score_candidates

    rng = np.random.default_rng(0)
    rows = 600
    frame = pd.DataFrame(
        {
            "qid": np.repeat([f"q{i}" for i in range(rows // 20)], 20),
            "product_id": [f"p{i}" for i in range(rows)],
            "s_a": rng.normal(size=rows),
            "s_b": np.where(rng.random(rows) < 0.2, np.nan, rng.normal(size=rows)),
        }
    )
    frame["gain"] = (frame["s_a"] + frame["s_b"].fillna(0) > 0.5).astype(float)
    model = fit_lambdamart(frame, ["s_a", "s_b"], params={"n_estimators": 30, "min_child_samples": 2})
    expected = score_candidates(model, frame)  # tables built on first use
    assert model._shap
    # LightGBM's own TreeSHAP agrees, and is not what the fusion called
    contributions = [c for c in expected.columns if c.startswith("c_")]
    inputs = expected[["s_a", "s_b"]].to_numpy()
    np.testing.assert_allclose(
        expected[contributions].to_numpy(), model.booster.predict(inputs, pred_contrib=True), atol=1e-9
    )
    predict = model.booster.predict

    def no_contrib(data, *args, **kwargs):
        assert not kwargs.get("pred_contrib"), "LightGBM's TreeSHAP was called"
        return predict(data, *args, **kwargs)

    monkeypatch.setattr(model.booster, "predict", no_contrib)
    lazy = score_candidates(model, frame, explain_top=3)
    top = (lazy["rank"] <= 3).to_numpy()
    pd.testing.assert_frame_equal(lazy[top], expected[top])
    assert lazy.loc[~top, contributions].isna().all().all()


def test_tables_too_large_are_refused_and_lightgbm_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionrank import treeshap
    from fusionrank.fusion import _shap_tables, fit_lambdamart

    booster, _ = _booster(rows=400)
    monkeypatch.setattr(treeshap, "MAX_TABLE_VALUES", 1)
    with pytest.raises(DataError, match="at most 1 and 16"):
        TreeShapTables.from_booster(booster)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "qid": np.repeat(["q0", "q1", "q2", "q3"], 20),
            "product_id": [f"p{i}" for i in range(80)],
            "s_a": rng.normal(size=80),
        }
    )
    frame["gain"] = (frame["s_a"] > 0.5).astype(float)
    model = fit_lambdamart(frame, ["s_a"], params={"n_estimators": 5, "min_child_samples": 2})
    assert _shap_tables(model) is None
    assert model._shap is False  # not tried again on the next request
