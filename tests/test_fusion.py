"""Each fusion on tiny hand-made candidate frames, the one scoring function, and the save/load round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.errors import ConfigError, DataError
from fusionrank.fusion import (
    BIAS_COLUMN,
    FusionModel,
    cascade_shortlist,
    contribution_column,
    fit_all,
    fit_cascade,
    fit_lambdamart,
    fit_weighted,
    ranking_metrics,
    score_candidates,
)


def _frame(n_queries: int = 40, n_candidates: int = 10, seed: int = 0) -> pd.DataFrame:
    """Graded gains; `s_perfect` orders by gain, `s_noise` is noise, `s_a`/`s_b` are gain plus noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for q in range(n_queries):
        gain = rng.choice([0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0], size=n_candidates)
        gain[rng.integers(n_candidates)] = 1.0  # every query has something to find
        parts.append(
            pd.DataFrame(
                {
                    "qid": f"q{q:03d}",
                    "product_id": [f"p{q}-{i}" for i in range(n_candidates)],
                    "gain": gain,
                    "s_perfect": gain * 10 + rng.uniform(0, 0.01, n_candidates),
                    "s_noise": rng.normal(size=n_candidates),
                    "s_a": gain + rng.normal(0, 0.4, n_candidates),
                    "s_b": 100 * gain + rng.normal(0, 40, n_candidates),
                    "f_len": rng.integers(1, 20, n_candidates).astype(float),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return _frame()


@pytest.fixture(scope="module")
def models(frame: pd.DataFrame) -> dict[str, FusionModel]:
    return {
        "weighted": fit_weighted(frame, ["s_noise", "s_a", "s_b"]),
        "cascade": fit_cascade(frame, ["s_noise", "s_a"], rerank_signal="s_perfect", k=3),
        "lambdamart": fit_lambdamart(frame, ["s_noise", "s_a", "s_b", "f_len"]),
    }


def _contributions(scored: pd.DataFrame) -> list[str]:
    return [c for c in scored.columns if c.startswith("c_")]


def test_weighted_puts_more_weight_on_the_perfect_signal(frame: pd.DataFrame) -> None:
    model = fit_weighted(frame, ["s_noise", "s_perfect"])
    assert model.weights["s_perfect"] > model.weights["s_noise"]
    assert model.fit_info["fit_score"] == pytest.approx(1.0)
    assert sum(model.weights.values()) == pytest.approx(1.0)


def test_weighted_beats_every_single_signal_it_fuses(frame: pd.DataFrame) -> None:
    model = fit_weighted(frame, ["s_noise", "s_a", "s_b"])
    singles = model.fit_info["single_signal_scores"]
    assert model.fit_info["fit_score"] > max(singles.values())
    scored = score_candidates(model, frame)
    assert ranking_metrics(scored, "score", ["ndcg@10"])["ndcg@10"] == pytest.approx(
        model.fit_info["fit_score"]
    )


@pytest.mark.parametrize(("ours", "theirs"), [("minmax", "min-max"), ("zscore", "zmuv"), ("rank", "rank")])
def test_weighted_scores_equal_ranx_fusion(frame: pd.DataFrame, ours: str, theirs: str) -> None:
    from ranx import Run, fuse

    model = FusionModel(
        kind="weighted", signals=["s_a", "s_b"], normalization=ours, weights={"s_a": 0.3, "s_b": 0.7}
    )
    scored = score_candidates(model, frame)
    runs = [
        Run.from_dict(
            {q: dict(zip(g["product_id"], g[s], strict=True)) for q, g in frame.groupby("qid")}, name=s
        )
        for s in ("s_a", "s_b")
    ]
    fused = fuse(runs, norm=theirs, method="wsum", params={"weights": [0.3, 0.7]}).to_dict()
    expected = [fused[q][p] for q, p in zip(scored["qid"], scored["product_id"], strict=True)]
    np.testing.assert_allclose(scored["score"], expected, rtol=1e-9, atol=1e-9)


def test_lambdamart_ranks_unseen_queries_correctly(frame: pd.DataFrame) -> None:
    model = fit_lambdamart(frame, ["s_noise", "s_perfect"])
    fresh = _frame(n_queries=30, seed=1)
    scored = score_candidates(model, fresh)
    assert ranking_metrics(scored, "score", ["ndcg@10"])["ndcg@10"] > 0.95
    assert ranking_metrics(fresh, "s_noise", ["ndcg@10"])["ndcg@10"] < 0.8
    assert model.fit_info["best_iteration"] >= 1


def test_lambdamart_does_not_depend_on_the_order_of_a_querys_candidates(frame: pd.DataFrame) -> None:
    # LightGBM's NDCG ranks tied scores in row order: with the relevant rows listed first, early stopping
    # would favour the first trees, which tie most rows; the fit must see the same rows either way
    codes = pd.factorize(frame["qid"])[0]
    relevant_first = frame.iloc[np.lexsort((-frame["gain"].to_numpy(), codes))].reset_index(drop=True)
    relevant_last = frame.iloc[np.lexsort((frame["gain"].to_numpy(), codes))].reset_index(drop=True)
    signals = ["s_noise", "s_a", "f_len"]
    first, last = fit_lambdamart(relevant_first, signals), fit_lambdamart(relevant_last, signals)
    assert first.fit_info == last.fit_info
    assert first.booster.model_to_string() == last.booster.model_to_string()


def test_cascade_only_reorders_the_first_stage_top_k(frame: pd.DataFrame) -> None:
    first = fit_weighted(frame, ["s_noise"])
    model = fit_cascade(frame, first, rerank_signal="s_perfect", k=3)
    cascade = score_candidates(model, frame)
    base = score_candidates(first, frame)
    for qid, ranked in cascade.groupby("qid", sort=False):
        before = base[base["qid"] == qid]["product_id"].tolist()
        after = ranked["product_id"].tolist()
        assert set(after[:3]) == set(before[:3])
        assert after[3:] == before[3:]
        top = ranked.head(3)["s_perfect"].to_numpy()
        assert (np.diff(top) <= 0).all()
    assert len(cascade_shortlist(model, frame)) == 3 * frame["qid"].nunique()


def test_cascade_with_k_above_the_list_is_the_reranker_alone(frame: pd.DataFrame) -> None:
    model = fit_cascade(frame, ["s_noise"], rerank_signal="s_perfect", k=50)
    assert model.fit_info["fit_score"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["weighted", "cascade", "lambdamart"])
def test_contributions_sum_to_the_score(
    models: dict[str, FusionModel], frame: pd.DataFrame, kind: str
) -> None:
    model = models[kind]
    scored = score_candidates(model, frame)
    columns = _contributions(scored)
    assert {contribution_column(s) for s in model.signals} <= set(columns)
    if kind != "weighted":
        assert BIAS_COLUMN in columns
    np.testing.assert_allclose(scored[columns].sum(axis=1), scored["score"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["weighted", "cascade", "lambdamart"])
def test_scores_are_sorted_by_qid_then_score_with_ranks(
    models: dict[str, FusionModel], frame: pd.DataFrame, kind: str
) -> None:
    scored = score_candidates(models[kind], frame)
    assert len(scored) == len(frame)
    assert scored["qid"].is_monotonic_increasing
    for _, group in scored.groupby("qid"):
        assert (np.diff(group["score"].to_numpy()) <= 0).all()
        assert group["rank"].tolist() == list(range(1, len(group) + 1))


@pytest.mark.parametrize("kind", ["weighted", "cascade", "lambdamart"])
def test_save_load_round_trip_scores_identically(
    models: dict[str, FusionModel], frame: pd.DataFrame, kind: str, tmp_path: Path
) -> None:
    model = models[kind]
    model.save(tmp_path / kind)
    loaded = FusionModel.load(tmp_path / kind)
    assert (loaded.kind, loaded.signals) == (model.kind, model.signals)
    pd.testing.assert_frame_equal(score_candidates(loaded, frame), score_candidates(model, frame))
    written = sorted(p.name for p in (tmp_path / kind).rglob("*") if p.is_file())
    assert all(name.endswith((".json", ".txt")) for name in written)
    if kind == "lambdamart":
        assert (tmp_path / kind / "lambdamart.txt").read_text().startswith("tree")


def test_prediction_threads_reach_lightgbm_change_no_score_and_are_not_saved(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    """A server gives LightGBM its share of the cores; a row's score and contributions stay the same."""
    model = fit_lambdamart(frame, ["s_noise", "s_a", "s_b", "f_len"])
    default = score_candidates(model, frame)
    asked: list[int | None] = []
    predict = model.booster.predict

    def recording(*args, **kwargs):
        asked.append(kwargs.get("num_threads"))
        return predict(*args, **kwargs)

    model.booster.predict = recording
    model.use_threads(2)
    pd.testing.assert_frame_equal(score_candidates(model, frame), default)
    assert asked == [2]  # the scores; the contributions come from the TreeSHAP tables
    model._shap = False  # as for a model the tables cannot hold: LightGBM's TreeSHAP answers
    pd.testing.assert_frame_equal(score_candidates(model, frame), default)
    assert asked == [2, 2, 2]
    model.save(tmp_path / "lambdamart")
    assert FusionModel.load(tmp_path / "lambdamart").threads == 0
    cascade = fit_cascade(frame, ["s_noise", "s_a"], rerank_signal="s_perfect", k=3)
    cascade.use_threads(3)
    assert (cascade.threads, cascade.first_stage.threads) == (3, 3)
    with pytest.raises(ConfigError, match="must not be negative"):
        model.use_threads(-1)


@pytest.mark.parametrize("kind", ["weighted", "cascade", "lambdamart"])
def test_a_missing_signal_column_is_reported_not_fatal(
    models: dict[str, FusionModel], frame: pd.DataFrame, kind: str
) -> None:
    scored = score_candidates(models[kind], frame.drop(columns=["s_a"]))
    assert scored.attrs["missing_signals"] == ["s_a"]
    assert scored["score"].notna().all()
    columns = _contributions(scored)
    np.testing.assert_allclose(scored[columns].sum(axis=1), scored["score"], atol=1e-12)
    if kind == "weighted":
        assert (scored["c_a"] == 0).all()
    assert score_candidates(models[kind], frame).attrs["missing_signals"] == []


@pytest.mark.parametrize("kind", ["weighted", "cascade", "lambdamart"])
def test_a_request_without_candidates_scores_to_an_empty_ranking(
    models: dict[str, FusionModel], frame: pd.DataFrame, kind: str
) -> None:
    scored = score_candidates(models[kind], frame.iloc[:0])
    assert len(scored) == 0
    assert {"score", "rank", *(contribution_column(s) for s in models[kind].signals)} <= set(scored.columns)


def test_equal_scores_are_ordered_like_the_evaluation_harness(frame: pd.DataFrame) -> None:
    from fusionrank.evaluation import to_run

    flat = frame.assign(s_flat=1.0)
    model = FusionModel(kind="weighted", signals=["s_flat"], weights={"s_flat": 1.0})
    scored = score_candidates(model, flat)
    run = {q: dict.fromkeys(g["product_id"], 1.0) for q, g in flat.groupby("qid")}
    harness = to_run(run, sorted(run), name="flat").to_dict()
    for qid, group in scored.groupby("qid"):
        expected = sorted(harness[qid], key=lambda p: -harness[qid][p])
        assert group["product_id"].tolist() == expected


def test_ranking_metrics_equal_ranx_on_run_objects(frame: pd.DataFrame) -> None:
    from ranx import Qrels, Run, evaluate

    metrics = ["ndcg@1", "ndcg@5", "ndcg@10", "recall@5", "mrr"]
    ours = ranking_metrics(frame, "s_a", metrics)
    # integer grades: ranx's Qrels stores integers, and linear NDCG does not change with the scale
    qrels = Qrels.from_dict(
        {
            q: {p: round(g * 3) for p, g in zip(d["product_id"], d["gain"], strict=True) if g > 0}
            for q, d in frame.groupby("qid")
        }
    )
    run = Run.from_dict(
        {q: dict(zip(d["product_id"], d["s_a"], strict=True)) for q, d in frame.groupby("qid")}
    )
    theirs = evaluate(qrels, run, metrics)
    assert ours == pytest.approx({m: float(v) for m, v in theirs.items()})
    per_query = ranking_metrics(frame, "s_a", ["ndcg@10"], per_query=True)
    assert list(per_query.index) == sorted(frame["qid"].unique())


def test_fit_all_fits_every_strategy_and_skips_the_cascade_without_bert(frame: pd.DataFrame) -> None:
    with_bert = frame.rename(columns={"s_perfect": "s_bert"})
    models = fit_all(with_bert, ["s_noise", "s_a", "s_bert", "f_len"], cascade_k=3)
    assert sorted(models) == ["cascade", "lambdamart", "weighted"]
    assert models["cascade"].rerank_signal == "s_bert"
    assert "s_bert" not in models["cascade"].first_stage.signals
    assert sorted(fit_all(frame, ["s_noise", "s_a"])) == ["lambdamart", "weighted"]


def test_bad_inputs_name_the_problem(frame: pd.DataFrame, tmp_path: Path) -> None:
    shuffled = frame.sample(frac=1.0, random_state=0)
    with pytest.raises(DataError, match="contiguous"):
        fit_weighted(shuffled, ["s_a"])
    with pytest.raises(DataError, match="positive gain"):
        fit_weighted(frame.assign(gain=0.0), ["s_a"])
    with pytest.raises(DataError, match="lacks column"):
        fit_weighted(frame, ["s_unknown"])
    with pytest.raises(ConfigError, match="normalization"):
        fit_weighted(frame, ["s_a"], normalization="softmax")
    with pytest.raises(ConfigError, match="k must be"):
        fit_cascade(frame, ["s_a"], rerank_signal="s_perfect", k=0)
    with pytest.raises(DataError, match="not a saved fusion"):
        FusionModel.load(tmp_path)


def test_report_writes_markdown_json_and_plot_with_published_figures(tmp_path: Path) -> None:
    from fusionrank.report import dataset_report, write_report

    valid = _frame(seed=2).rename(columns={"s_perfect": "s_bert"})
    test = _frame(n_queries=30, seed=3).rename(columns={"s_perfect": "s_bert"})
    models = fit_all(valid, ["s_noise", "s_a", "s_b", "s_bert"], cascade_k=3)
    report = dataset_report("amazon-games", test, models, valid_frame=valid, cascade_ks=(2, 5))
    assert report.baseline == "bert"
    assert report.baseline_chosen_on == "validation"
    assert [row["k"] for row in report.cascade_sweep] == [2.0, 5.0]
    paths = write_report([report], tmp_path)
    data = json.loads(paths["json"].read_text())
    figures = data["datasets"]["amazon-games"]
    assert figures["published"]["values"]["SASRec (LLMRank table)"] == pytest.approx(0.7592)
    means = figures["evaluation"]["slices"]["all"]["means"]
    assert set(means) == {"noise", "a", "b", "bert", "fusion:weighted", "fusion:cascade", "fusion:lambdamart"}
    assert means["bert"]["ndcg@10"] == pytest.approx(1.0)
    markdown = paths["markdown"].read_text()
    assert "SASRec (LLMRank table) | 75.92" in markdown
    assert "| fusion:lambdamart |" in markdown
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_a_rerank_budget_reorders_only_the_first_stage_top_k(frame: pd.DataFrame) -> None:
    from fusionrank.fusion import rerank_shortlist, score_with_rerank

    bert_frame = frame.assign(s_bert=frame["s_perfect"])
    model = fit_weighted(bert_frame, ["s_noise", "s_a", "s_bert"])
    first = score_candidates(model, bert_frame.assign(s_bert=np.nan))
    full = score_candidates(model, bert_frame)

    budgeted = score_with_rerank(model, bert_frame, 3)
    assert len(budgeted) == len(bert_frame)
    for qid, rows in budgeted.groupby("qid"):
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1))
        # the top 3 are the first stage's top 3, in the full fusion's order; the rest keep the first order
        top3 = first[(first["qid"] == qid) & (first["rank"] <= 3)]["product_id"]
        assert set(rows["product_id"].head(3)) == set(top3)
        in_full = full[full["product_id"].isin(set(top3))]["product_id"].tolist()
        assert rows["product_id"].head(3).tolist() == in_full
        rest = first[(first["qid"] == qid) & (first["rank"] > 3)]["product_id"].tolist()
        assert rows["product_id"].iloc[3:].tolist() == rest
    assert len(rerank_shortlist(model, bert_frame, 3)) == 3 * bert_frame["qid"].nunique()
    # scores descend with rank, and the contributions still sum to the score
    for _, rows in budgeted.groupby("qid"):
        assert rows["score"].is_monotonic_decreasing
    parts = budgeted[[c for c in budgeted.columns if c.startswith("c_")]].sum(axis=1)
    assert np.allclose(parts, budgeted["score"])

    def ndcg(scored: pd.DataFrame) -> float:
        return ranking_metrics(scored, -scored["rank"].to_numpy(float), ["ndcg@10"])["ndcg@10"]

    # the cross-encoder is the perfect signal here: more of it, better rankings
    assert ndcg(score_with_rerank(model, bert_frame, 0)) < ndcg(budgeted) < ndcg(full)
    pd.testing.assert_frame_equal(score_with_rerank(model, bert_frame, None), full)
    # a cross-encoder without weight changes nothing, whatever its budget
    unweighted = dataclasses.replace(model, weights={**model.weights, "s_bert": 0.0})
    first_order = score_candidates(unweighted, bert_frame.assign(s_bert=np.nan))
    budgeted_order = score_with_rerank(unweighted, bert_frame, 3)
    assert budgeted_order["product_id"].tolist() == first_order["product_id"].tolist()
    # ... and its scores are the one-stage fusion's: no second tier is lifted above the rest
    pd.testing.assert_frame_equal(budgeted_order, score_candidates(unweighted, bert_frame))
    # without the cross-encoder column in the model, the budget does nothing
    plain = fit_weighted(frame, ["s_noise", "s_a"])
    pd.testing.assert_frame_equal(score_with_rerank(plain, frame, 3), score_candidates(plain, frame))


def test_head_rmse_is_kaggles_metric_on_the_judged_pairs_the_head_scored() -> None:
    from fusionrank.report import head_rmse

    test = pd.DataFrame(
        {
            "qid": ["q1", "q1", "q1", "q2", "q2"],
            "product_id": ["a", "b", "c", "a", "d"],
            "gain": [2.0, 0.0, 0.0, 1.0, 0.0],
            # a: exact (gain 2 -> relevance 3); b: 0.5 off; c: unjudged; q2/a: 5.0 clipped to 3; d: no score
            "s_bert": [2.0, 0.5, 1.0, 5.0, np.nan],
        }
    )
    qrels = pd.DataFrame(
        {"qid": ["q1", "q1", "q2", "q2"], "product_id": ["a", "b", "a", "d"], "gain": [2.0, 0.0, 1.0, 0.0]}
    )
    valid_qrels = pd.DataFrame({"qid": ["v"], "product_id": ["x"], "gain": [1.0]})  # mean relevance 2
    head, constant = head_rmse(test, qrels, valid_qrels).values()
    # judged and scored: (3 vs 3), (1.5 vs 1), (3 vs 2); c is unjudged and d has no score
    assert head == pytest.approx(np.sqrt((0.0 + 0.25 + 1.0) / 3))
    assert constant == pytest.approx(np.sqrt((1.0 + 1.0 + 0.0) / 3))
    assert head_rmse(test.assign(s_bert=np.nan), qrels, valid_qrels) == {}


def test_features_in_candidate_order_join_as_the_keyed_merge_does() -> None:
    """The server's features come in candidate order and skip the join; any other order is merged on the
    keys: both give the same frame."""
    from fusionrank.context import Context, RankingExample
    from fusionrank.ranker import _same_rows, signal_frame

    examples = [
        RankingExample(Context(query="drill"), ["p1", "p2", "p3"], {"p2": 1.0}),
        RankingExample(Context(query="lamp"), ["p3", "p4"]),
    ]
    qids = [e.qid for e in examples for _ in e.candidates]
    features = pd.DataFrame(
        {
            "qid": qids,
            "product_id": ["p1", "p2", "p3", "p3", "p4"],
            "f_price": [1.0, 2.0, 3.0, 3.5, 4.0],
            "f_count": [1, 2, 3, 3, 4],
        }
    )
    aligned = signal_frame(examples, {}, features)
    shuffled = signal_frame(examples, {}, features.iloc[[4, 2, 0, 3, 1]])
    merged = pd.DataFrame({"qid": qids, "product_id": features["product_id"], "gain": [0.0, 1.0, 0, 0, 0]})
    merged = merged.merge(features, on=["qid", "product_id"], how="left")
    pd.testing.assert_frame_equal(aligned, merged)
    pd.testing.assert_frame_equal(shuffled, merged)
    partial = signal_frame(examples, {}, features.iloc[:2])  # fewer rows: the others stay missing
    # the aligned frame takes the path without a join, the shuffled one the join
    keys = merged[["qid", "product_id", "gain"]]
    assert _same_rows(keys, features)
    assert not _same_rows(keys, features.iloc[[4, 2, 0, 3, 1]])
    assert partial["f_price"].isna().tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("rerank_k", [None, 3])
def test_explaining_only_the_top_rows_keeps_scores_ranks_and_their_contributions(
    frame: pd.DataFrame, rerank_k: int | None
) -> None:
    """A server lists each request's top k: a LambdaMART's contributions (TreeSHAP, its cost) are computed
    for those rows only, and everything else it answers is the same as with every row explained."""
    from fusionrank.fusion import score_with_rerank

    bert_frame = frame.assign(s_bert=frame["s_perfect"])
    model = fit_lambdamart(bert_frame, ["s_noise", "s_a", "s_bert"])
    full = score_with_rerank(model, bert_frame, rerank_k)
    lazy = score_with_rerank(model, bert_frame, rerank_k, explain_top=2)
    parts = _contributions(full)
    pd.testing.assert_frame_equal(lazy.drop(columns=parts), full.drop(columns=parts), rtol=1e-9)
    top = lazy["rank"] <= 2
    np.testing.assert_allclose(lazy.loc[top, parts], full.loc[top, parts], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lazy.loc[top, parts].sum(axis=1), lazy.loc[top, "score"], atol=1e-9)
    assert lazy.loc[~top, parts].isna().all().all()
    # other kinds explain every row whatever is asked (their contributions cost no more than the score)
    weighted = fit_weighted(frame, ["s_noise", "s_a"])
    pd.testing.assert_frame_equal(
        score_candidates(weighted, frame, explain_top=1), score_candidates(weighted, frame)
    )
