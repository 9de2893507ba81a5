"""Evaluate a run's candidate on its test split, against every single signal and against the champion.

The champion is scored on this run's test requests through its own bundle (`Ranker`), the same path the
server takes, so the comparison is paired: same requests, same candidates, same judgments.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrank.ranker import FEATURE_PREFIX, SIGNAL_PREFIX, Ranker, examples_from_frames

GATE_METRIC = "ndcg@10"
METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20", "recall@10", "recall@50", "mrr")


def read_split_frames(frames_dir: Path, which: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A split's candidate frame, its contexts, and its qrels (every judged product, retrieved or not)."""
    frame = pd.read_parquet(frames_dir / f"{which}.parquet")
    contexts = pd.read_parquet(frames_dir / f"{which}_contexts.parquet")
    qrels = pd.read_parquet(frames_dir / f"{which}_qrels.parquet")
    return frame, contexts, qrels


def frame_run(frame: pd.DataFrame, scores: np.ndarray | pd.Series) -> dict[str, dict[str, float]]:
    """A ranx-style run (qid -> product -> score) from a frame and one score per row."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isnan(values), -np.inf, values)
    run: dict[str, dict[str, float]] = {}
    for qid, pid, value in zip(
        frame["qid"].astype(str), frame["product_id"].astype(str), values, strict=True
    ):
        run.setdefault(qid, {})[pid] = float(value)
    return run


def fused_run(model, frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The run of a fitted fusion over a frame, through the one scoring function."""
    from fusionrank.fusion import score_candidates

    scored = score_candidates(model, frame)
    return frame_run(scored, scored["score"])


def slices_of(contexts: pd.DataFrame) -> dict[str, set[str]]:
    """Request slices: short vs long queries (search), short vs long histories (recommendation)."""
    qid = contexts["qid"].astype(str)
    if contexts["query"].notna().any():
        words = contexts["query"].fillna("").str.split().str.len()
        return {"queries of 1-2 words": set(qid[words <= 2]), "queries of 3+ words": set(qid[words > 2])}
    length = contexts["history"].map(len)
    return {"histories < 5 items": set(qid[length < 5]), "histories >= 5 items": set(qid[length >= 5])}


def _fusion_models(fusion_dir: Path) -> tuple[dict, str]:
    from fusionrank.fusion import FusionModel

    info = json.loads((fusion_dir / "fusion.json").read_text())
    return {kind: FusionModel.load(fusion_dir / kind) for kind in info["fusions"]}, info["selected"]


def evaluate_candidate(scored_dir: Path, fusion_dir: Path, registry_uri: str, model_name: str) -> dict:
    """Every single signal and every fusion on the test split, per slice, and the champion comparison."""
    from fusionrank.evaluation import evaluate_runs
    from fusionrank.fusion import best_single_signal

    test, contexts, qrels = read_split_frames(scored_dir, "test")
    valid = pd.read_parquet(scored_dir / "valid.parquet")
    examples = examples_from_frames(test, contexts, qrels)
    models, selected = _fusion_models(fusion_dir)
    runs = signal_runs(test)
    for kind, model in models.items():
        runs[f"fusion:{kind}"] = fused_run(model, test)
    # chosen on the validation split, not on the test split it is compared on
    signals = [c for c in valid.columns if c.startswith(SIGNAL_PREFIX)]
    baseline = best_single_signal(valid, signals, GATE_METRIC).removeprefix(SIGNAL_PREFIX)
    report = evaluate_runs(examples, runs, METRICS, slices=slices_of(contexts), baseline=baseline)
    candidate_run = f"fusion:{selected}"
    candidate = {m: report.mean(candidate_run, m) for m in METRICS}
    result: dict = {
        "selected": selected,
        "baseline": baseline,
        "candidate": candidate,
        "baseline_metrics": {m: report.mean(baseline, m) for m in METRICS},
        "p_value_vs_baseline": report.slices[0].p_values.get(candidate_run, {}).get(GATE_METRIC),
        "report": report.to_dict(),
        "champion": None,
        "champion_version": None,
        "p_value": None,
    }
    markdown = [report.to_markdown(title=f"Test split: every signal and fusion (selected: {selected})")]
    recall = _generator_recall(scored_dir)
    if recall:
        result["generator_recall"] = recall
        markdown.append(_recall_markdown(recall))
    distillation = distillation_summary(examples, runs, (valid, test))
    if distillation is not None:
        result["distillation"] = distillation
        markdown.append(distillation_markdown(distillation))
    champion = _champion_runs(registry_uri, model_name, examples, test)
    if champion is not None:
        version, champion_run = champion
        paired = evaluate_runs(
            examples,
            {"champion": champion_run, "candidate": runs[candidate_run]},
            METRICS,
            baseline="champion",
        )
        result["champion"] = {m: paired.mean("champion", m) for m in METRICS}
        result["champion_version"] = version
        result["p_value"] = paired.slices[0].p_values["candidate"][GATE_METRIC]
        markdown.append(paired.to_markdown(title=f"Candidate against champion (version {version})"))
    else:
        markdown.append("No champion yet: the gate's floors alone decide.\n")
    result["markdown"] = "\n".join(markdown)
    result["headline"] = {
        **candidate,
        **({f"champion_{k}": v for k, v in result["champion"].items()} if result["champion"] else {}),
    }
    return result


# issue #11's distillation target: the bi-encoder (student) against the cross-encoder (teacher), as gains
# over the lexical first stage on the same test candidates
TEACHER, STUDENT, LEXICAL = "bert", "dense", "bm25"
RECOVERY_TARGET = 0.8
ALONE, FUSED = "alone", f"fused with {LEXICAL}"


def signal_runs(test: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Each signal's ranking of a frame's candidates, by signal name (`s_bm25` -> `bm25`)."""
    return {
        column.removeprefix(SIGNAL_PREFIX): frame_run(test, test[column])
        for column in test.columns
        if column.startswith(SIGNAL_PREFIX)
    }


def frames_distillation(scored_dir: Path) -> dict | None:
    """The distillation figure of a folder of scored frames, as `evaluate_candidate` reports it."""
    test, contexts, qrels = read_split_frames(scored_dir, "test")
    valid = pd.read_parquet(scored_dir / "valid.parquet")
    return distillation_summary(examples_from_frames(test, contexts, qrels), signal_runs(test), (valid, test))


def distillation_summary(
    examples, runs: dict[str, dict], frames: tuple[pd.DataFrame, pd.DataFrame] | None = None
) -> dict | None:
    """The share of the cross-encoder's NDCG@10 gain over BM25 that the distilled bi-encoder recovers.

    Two readings, each on the same test requests with ranx's paired test against BM25: each signal ranking
    the candidates alone, and each fused with BM25 (a weighted fusion of the two), which is how the ranker
    uses them: a re-ranker's gain over its first stage. `frames` is (valid, test): the
    fusions are fitted on the first and score the second, the frame of `examples`. A reading's `recovered`
    is None when the teacher does not beat BM25 in it (there is no gain to recover). None without all three
    signals (recommendation runs have no BM25); without `frames`, the alone reading only.
    """
    from fusionrank.evaluation import evaluate_runs
    from fusionrank.fusion import fit_weighted

    if not {TEACHER, STUDENT, LEXICAL} <= runs.keys():
        return None
    # reading -> the run names of (teacher, student); every run is evaluated in one pass against BM25
    readings, compared = {ALONE: (TEACHER, STUDENT)}, {n: runs[n] for n in (LEXICAL, TEACHER, STUDENT)}
    if frames is not None:
        valid, test = frames
        readings[FUSED] = (f"{LEXICAL}+{TEACHER}", f"{LEXICAL}+{STUDENT}")
        for name in (TEACHER, STUDENT):
            fusion = fit_weighted(valid, [SIGNAL_PREFIX + LEXICAL, SIGNAL_PREFIX + name])
            compared[f"{LEXICAL}+{name}"] = fused_run(fusion, test)
    report = evaluate_runs(examples, compared, [GATE_METRIC], baseline=LEXICAL)
    p_values = report.slices[0].p_values
    lexical = report.mean(LEXICAL, GATE_METRIC)
    summary: dict = {
        "metric": GATE_METRIC,
        "target": RECOVERY_TARGET,
        "requests": report.slices[0].n_queries,
        "readings": {},
    }
    for reading, (teacher, student) in readings.items():
        ndcg = {TEACHER: report.mean(teacher, GATE_METRIC), STUDENT: report.mean(student, GATE_METRIC)}
        teacher_gain, student_gain = ndcg[TEACHER] - lexical, ndcg[STUDENT] - lexical
        recovered = student_gain / teacher_gain if teacher_gain > 0 else None
        summary["readings"][reading] = {
            LEXICAL: lexical,
            **ndcg,
            "teacher_gain": teacher_gain,
            "student_gain": student_gain,
            "p_teacher_vs_lexical": p_values.get(teacher, {}).get(GATE_METRIC),
            "p_student_vs_lexical": p_values.get(student, {}).get(GATE_METRIC),
            "recovered": recovered,
            "meets_target": recovered is not None and recovered >= RECOVERY_TARGET,
        }
    return summary


def distillation_markdown(d: dict) -> str:
    def p(value: float | None) -> str:
        return "" if value is None else f"{value:.2g}"

    lines = [
        f"### Distillation: the bi-encoder against its teacher ({d['requests']} test requests)",
        "",
        f"| reading | {LEXICAL} | {TEACHER} (cross-encoder, teacher): {d['metric']}, gain, p | "
        f"{STUDENT} (bi-encoder, student): {d['metric']}, gain, p | recovered |",
        "|---|---:|---|---|---:|",
    ]
    for reading, r in d["readings"].items():
        share = "no gain to recover" if r["recovered"] is None else f"{r['recovered']:.1%}"
        lines.append(
            f"| {reading} | {r[LEXICAL]:.4f} | {r[TEACHER]:.4f}, {r['teacher_gain']:+.4f}, "
            f"{p(r['p_teacher_vs_lexical'])} | {r[STUDENT]:.4f}, {r['student_gain']:+.4f}, "
            f"{p(r['p_student_vs_lexical'])} | {share} |"
        )
    lines += [
        "",
        f"Recovered: the student's gain over {LEXICAL} as a share of the teacher's "
        f"(target {d['target']:.0%}); fused: a weighted fusion of {LEXICAL} and the signal, "
        "fitted on the validation split.",
    ]
    return "\n".join(lines) + "\n"


def _generator_recall(scored_dir: Path) -> dict[str, dict[str, float]]:
    """Recall@100 of each candidate generator per split, as the bi-encoder step measured it."""
    path = scored_dir / "frames.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return info.get("generator_recall", {})


def _recall_markdown(recall: dict[str, dict[str, float]]) -> str:
    names = sorted({name for values in recall.values() for name in values})
    lines = [
        "### Candidate generators: recall@100 of every judged relevant product",
        "",
        "| split | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for split, values in recall.items():
        lines.append(f"| {split} | " + " | ".join(f"{values.get(n, float('nan')):.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _champion_runs(registry_uri: str, model_name: str, examples, test: pd.DataFrame):
    """The champion's version and its run on this test split, or None without a champion."""
    from fusionrank.registry import Registry

    registry = Registry(registry_uri, model_name)
    champion = registry.champion()
    if champion is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        ranker = Ranker.load(registry.download(champion.version, tmp))
        features = test[["qid", "product_id", *[c for c in test.columns if c.startswith(FEATURE_PREFIX)]]]
        scored = ranker.score(ranker.frame(examples, features))
    return champion.version, frame_run(scored, scored["score"])


def scored_reference(scored_dir: Path, fusion_dir: Path) -> pd.DataFrame:
    """This run's validation frame with the selected fusion's score: what drift compares across runs."""
    from fusionrank.fusion import score_candidates

    models, selected = _fusion_models(fusion_dir)
    valid = pd.read_parquet(scored_dir / "valid.parquet")
    scored = score_candidates(models[selected], valid)
    keep = [c for c in scored.columns if c.startswith((SIGNAL_PREFIX, FEATURE_PREFIX))] + ["score"]
    return scored[keep]


def drift_against_champion(
    scored_dir: Path, fusion_dir: Path, registry_uri: str, model_name: str, html_path: Path
) -> dict:
    """Evidently drift of this run's scored validation frame against the champion's reference frame."""
    from fusionrank.drift import compute_drift
    from fusionrank.registry import Registry

    current = scored_reference(scored_dir, fusion_dir)
    registry = Registry(registry_uri, model_name)
    champion = registry.champion()
    if champion is None:
        html_path.write_text(
            "<!doctype html><html><body><h1>Drift</h1><p>No champion yet: no reference to compare with; "
            "drift was not checked.</p></body></html>"
        )
        return {"checked": False, "drift_share": 0.0, "reason": "no champion: drift not checked"}
    with tempfile.TemporaryDirectory() as tmp:
        reference = pd.read_parquet(registry.download(champion.version, tmp) / "reference.parquet")
    columns = [c for c in current.columns if c in reference.columns and c != "score"]
    result = compute_drift(reference, current, columns, score_column="score", html_path=html_path)
    return {"checked": True, "champion_version": champion.version, **result.to_dict()}
