"""The ranx harness against hand-computed metric values, ties, slices, significance and output formats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError
from fusionrank.evaluation import evaluate_runs, random_run, rmse, scores_to_run, to_qrels


def _examples() -> list[RankingExample]:
    return [
        RankingExample(Context(query="q1"), ["a", "b", "c"], {"a": 2.0, "b": 1.0}),
        RankingExample(Context(query="q2"), ["x", "y"], {"y": 1.33}),
        RankingExample(Context(query="q3"), ["z"], {"z": 0.0}),
    ]


RUNS = {
    "ideal": {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"y": 1.0, "x": 0.0}},
    "reversed": {"q1": {"a": 1.0, "b": 2.0, "c": 3.0}, "q2": {"x": 1.0, "y": 0.0}},
}


def test_metrics_match_a_hand_computed_case() -> None:
    report = evaluate_runs(_examples(), RUNS, metrics=("ndcg@10", "ndcg@1", "recall@1", "mrr"))
    # reversed q1: c (0), b (1), a (2): DCG = 1/log2(3) + 2/log2(4); IDCG = 2 + 1/log2(3)
    q1 = (1 / math.log2(3) + 2 / 2) / (2 + 1 / math.log2(3))
    # reversed q2: x (0), y (1.33): DCG = 1.33/log2(3); IDCG = 1.33 (linear gains, so the scale cancels)
    q2 = 1 / math.log2(3)
    assert report.mean("reversed", "ndcg@10") == pytest.approx((q1 + q2) / 2)
    assert report.mean("reversed", "ndcg@1") == pytest.approx(0.0)
    assert report.mean("reversed", "mrr") == pytest.approx((1 / 2 + 1 / 2) / 2)
    # recall@1: q1 has two relevant products, q2 one
    assert report.mean("ideal", "recall@1") == pytest.approx((1 / 2 + 1) / 2)
    assert report.mean("ideal", "ndcg@10") == pytest.approx(1.0)
    # q3 has no positive gain and cannot tell runs apart
    assert report.skipped == 1
    assert report.slices[0].n_queries == 2


def test_graded_gains_are_not_truncated_to_integers() -> None:
    # ranx stores integer relevance; 0.4 vs 0.6 must still order the ideal ranking
    examples = [RankingExample(Context(query="q"), ["lo", "hi"], {"lo": 0.4, "hi": 0.6})]
    wrong_order = {"run": {"q": {"lo": 1.0, "hi": 0.0}}}
    ndcg = evaluate_runs(examples, wrong_order, metrics=("ndcg@2",)).mean("run", "ndcg@2")
    assert ndcg == pytest.approx((0.4 + 0.6 / math.log2(3)) / (0.6 + 0.4 / math.log2(3)))
    assert to_qrels(examples).to_dict() == {"q": {"lo": 40, "hi": 60}}


def test_ties_are_broken_the_same_way_whatever_the_candidate_order() -> None:
    examples = [
        RankingExample(Context(user_id=str(u)), [f"c{i}" for i in range(20)], {"c7": 1.0}) for u in range(300)
    ]
    flat = {e.qid: dict.fromkeys(e.candidates, 1.0) for e in examples}
    flipped = {qid: dict(reversed(list(scores.items()))) for qid, scores in flat.items()}
    first = evaluate_runs(examples, {"flat": flat}, metrics=("ndcg@10",)).mean("flat", "ndcg@10")
    second = evaluate_runs(examples, {"flat": flipped}, metrics=("ndcg@10",)).mean("flat", "ndcg@10")
    assert first == second
    # an all-ties run lands near the expected value of a random order, not at the best or worst rank
    expected_random = sum(1 / math.log2(r + 2) for r in range(10)) / 20
    assert first == pytest.approx(expected_random, abs=0.03)


def test_slices_significance_and_outputs() -> None:
    rng = np.random.default_rng(0)
    examples = [
        RankingExample(Context(query=f"q{i}"), [f"d{j}" for j in range(10)], {"d0": 1.0}) for i in range(60)
    ]
    good = {
        e.qid: {"d0": 1.0, **{f"d{j}": float(rng.random() * 0.5) for j in range(1, 10)}} for e in examples
    }
    runs = {"random": random_run(examples, seed=1), "good": good}
    slices = {"first half": {f"q{i}" for i in range(30)}, "empty": set()}
    report = evaluate_runs(examples, runs, slices=slices, baseline="random", stat_test="fisher")
    assert [s.name for s in report.slices] == ["all", "first half", "empty"]
    assert report.slices[1].n_queries == 30
    assert report.mean("good", "mrr", "first half") == pytest.approx(1.0)
    assert report.slices[0].p_values["good"]["ndcg@10"] < 0.05
    assert report.slices[2].n_queries == 0
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["slices"]["all"]["means"]["good"]["recall@10"] == pytest.approx(1.0)
    markdown = report.to_markdown("demo")
    assert "| good | 1.0000* |" in markdown
    assert "| random (baseline) |" in markdown


def test_scores_to_run_aligns_scores_with_candidates() -> None:
    examples = _examples()[:2]
    run = scores_to_run(examples, [np.array([0.1, 0.2, 0.3]), np.array([5.0, 6.0])])
    assert run == {
        "q1": {"a": pytest.approx(0.1), "b": pytest.approx(0.2), "c": pytest.approx(0.3)},
        "q2": {"x": 5.0, "y": 6.0},
    }
    with pytest.raises(ConfigError, match="2 scores for 3 candidates"):
        scores_to_run(examples[:1], [np.array([1.0, 2.0])])


def test_unknown_baseline_and_rmse() -> None:
    with pytest.raises(ConfigError, match="baseline run 'nope'"):
        evaluate_runs(_examples(), RUNS, baseline="nope")
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    with pytest.raises(ConfigError):
        rmse([1.0], [1.0, 2.0])


def test_distillation_summary_is_the_share_of_the_teachers_gain_over_bm25_the_student_recovers() -> None:
    from fusionrank.champion import distillation_markdown, distillation_summary

    qids = ["q1", "q2", "q3", "q4"]
    examples = [RankingExample(Context(query=q), ["good", "bad"], {"good": 1.0}) for q in qids]
    ideal, reversed_ = {"good": 2.0, "bad": 1.0}, {"good": 1.0, "bad": 2.0}
    runs = {
        "bm25": {q: reversed_ for q in qids},  # NDCG@10 1/log2(3) on every request
        "bert": {q: ideal for q in qids},  # 1.0
        "dense": {q: ideal if q in ("q1", "q2") else reversed_ for q in qids},  # half the teacher's gain
    }
    summary = distillation_summary(examples, runs)
    alone = summary["readings"]["alone"]
    assert list(summary["readings"]) == ["alone"]  # no frames: no fused reading
    low = 1 / math.log2(3)
    assert alone["bm25"] == pytest.approx(low)
    assert alone["bert"] == pytest.approx(1.0)
    assert alone["teacher_gain"] == pytest.approx(1 - low)
    assert alone["student_gain"] == pytest.approx((1 - low) / 2)
    assert alone["recovered"] == pytest.approx(0.5)
    assert alone["meets_target"] is False
    assert summary["requests"] == 4
    assert "| alone | 0.6309 | 1.0000, +0.3691, " in distillation_markdown(summary)
    assert "| 50.0% |" in distillation_markdown(summary)

    runs["dense"] = runs["bert"]
    assert distillation_summary(examples, runs)["readings"]["alone"]["meets_target"] is True
    # a teacher no better than BM25 leaves nothing to recover: no share, and the report says so
    runs["bert"] = runs["bm25"]
    alone = distillation_summary(examples, runs)["readings"]["alone"]
    assert alone["recovered"] is None
    assert alone["meets_target"] is False
    assert "no gain to recover" in distillation_markdown(distillation_summary(examples, runs))
    # recommendation runs have no BM25 signal: no summary
    assert distillation_summary(examples, {k: v for k, v in runs.items() if k != "bm25"}) is None


def test_distillation_summary_fused_reading_fits_on_valid_and_scores_test() -> None:
    """Each signal fused with BM25 (weighted, fitted on the validation frame), against BM25 on test."""
    import pandas as pd

    from fusionrank.champion import distillation_summary, frame_run

    def frame(seed: int) -> tuple[pd.DataFrame, list[RankingExample]]:
        rng = np.random.default_rng(seed)
        parts, examples = [], []
        for q in range(30):
            gain = rng.choice([0.0, 0.0, 0.0, 1.0, 2.0], size=8)
            gain[0] = 2.0
            example = RankingExample(Context(query=f"query {q}"), [f"p{q}-{i}" for i in range(8)])
            example.gains.update({p: g for p, g in zip(example.candidates, gain, strict=True) if g > 0})
            examples.append(example)
            teacher = gain + rng.normal(0, 0.5, 8)
            parts.append(
                pd.DataFrame(
                    {
                        "qid": example.qid,
                        "product_id": example.candidates,
                        "gain": gain,
                        "s_bm25": gain + rng.normal(0, 2.0, 8),
                        "s_bert": teacher,
                        "s_dense": teacher,  # a student as good as its teacher
                    }
                )
            )
        return pd.concat(parts, ignore_index=True), examples

    valid, _ = frame(0)
    test, examples = frame(1)
    runs = {c.removeprefix("s_"): frame_run(test, test[c]) for c in ("s_bm25", "s_bert", "s_dense")}
    summary = distillation_summary(examples, runs, (valid, test))
    fused = summary["readings"]["fused with bm25"]
    assert fused["teacher_gain"] > 0
    assert fused["p_teacher_vs_lexical"] < 0.05
    assert fused["recovered"] == pytest.approx(1.0)
    assert fused["meets_target"] is True
    # a student that is noise recovers less of the fused gain than the teacher's own
    test["s_dense"] = np.random.default_rng(2).normal(size=len(test))
    valid["s_dense"] = np.random.default_rng(3).normal(size=len(valid))
    runs["dense"] = frame_run(test, test["s_dense"])
    fused = distillation_summary(examples, runs, (valid, test))["readings"]["fused with bm25"]
    assert fused["recovered"] < 0.5
