"""The evaluation harness on ranx: any set of runs, per slice, with paired significance tests.

Conventions, in one place:
- Gains come from `RankingExample.gains` (graded). ranx stores relevance as integers, so gains are
  multiplied by `GAIN_SCALE` and rounded before they reach it. NDCG uses linear gains (ranx's "ndcg",
  Järvelin & Kekäläinen), which a common factor does not change; Recall and MRR count a product as
  relevant when its gain is positive. Dataset-specific gains (Home Depot's relevance - 1) are made when
  the examples are built (`splits.search_examples(gain_offset=...)`), not here.
- A request without any positive gain cannot tell runs apart; it is left out and counted in `skipped`.
- Equal scores are ordered by a fixed hash of (request, product), so neither the candidate order nor
  where the held-out item was put can favour a run (popularity, for one, ties a lot).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fusionrank.context import RankingExample
from fusionrank.errors import ConfigError
from fusionrank.signals.base import Signal

DEFAULT_METRICS = ("ndcg@10", "recall@10", "recall@50", "mrr")
GAIN_SCALE = 100
ALL = "all"

RunScores = dict[str, dict[str, float]]


def to_qrels(examples: Iterable[RankingExample]) -> Any:
    """ranx Qrels of the examples' positive gains, scaled by `GAIN_SCALE` (requests without any left out)."""
    from ranx import Qrels

    judged = {}
    for example in examples:
        positive = {
            pid: round(g * GAIN_SCALE) for pid, g in example.gains.items() if round(g * GAIN_SCALE) > 0
        }
        if positive:
            judged[example.qid] = positive
    return Qrels(judged) if judged else Qrels()


def _tiebreak(qid: str, product_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(
        (zlib.crc32(f"{qid}\x1f{pid}".encode()) for pid in product_ids),
        dtype=np.int64,
        count=len(product_ids),
    )


def to_run(run: Mapping[str, Mapping[str, float]], qids: Sequence[str], name: str) -> Any:
    """A ranx Run over `qids` from scores; equal scores ordered by a fixed hash, missing requests empty.

    The Run holds descending rank values, not the raw scores, so that ranx's own (unstable) sort cannot
    reorder ties.
    """
    from ranx import Run

    ranked: dict[str, dict[str, float]] = {}
    for qid in qids:
        scores = run.get(qid, {})
        pids = list(scores)
        values = np.fromiter((scores[p] for p in pids), dtype=np.float64, count=len(pids))
        # lexsort's last key is primary: higher score first, then the hash
        order = np.lexsort((_tiebreak(qid, pids), -values))
        ranked[qid] = {pids[i]: float(len(pids) - r) for r, i in enumerate(order)}
    return Run(ranked, name=name)


def scores_to_run(examples: Sequence[RankingExample], scores: Sequence[np.ndarray]) -> RunScores:
    """A run (qid -> product -> score) from one score array per example, aligned with its candidates."""
    run: RunScores = {}
    for example, values in zip(examples, scores, strict=True):
        if len(values) != len(example.candidates):
            raise ConfigError(
                f"request {example.qid!r}: {len(values)} scores for {len(example.candidates)} candidates"
            )
        run[example.qid] = {pid: float(v) for pid, v in zip(example.candidates, values, strict=True)}
    return run


def signal_run(signal: Signal, examples: Sequence[RankingExample]) -> RunScores:
    """Score every example's candidates with `signal` (batched) and return the run."""
    scores = signal.score_batch([e.context for e in examples], [e.candidates for e in examples])
    return scores_to_run(examples, scores)


def random_run(examples: Sequence[RankingExample], seed: int = 0) -> RunScores:
    """A run that orders each example's candidates at random (seeded): the floor every ranker must beat."""
    rng = np.random.default_rng(seed)
    return scores_to_run(examples, [rng.random(len(e.candidates)) for e in examples])


@dataclass
class SliceResult:
    """The mean of each metric for each run over one slice of requests, and p-values against the baseline."""

    name: str
    n_queries: int
    means: dict[str, dict[str, float]]
    p_values: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    """Every figure of one evaluation: slices (the first is "all"), runs, metrics and significance."""

    metrics: tuple[str, ...]
    runs: tuple[str, ...]
    slices: list[SliceResult]
    baseline: str | None
    stat_test: str
    max_p: float
    skipped: int

    def mean(self, run: str, metric: str, slice_name: str = ALL) -> float:
        """The mean of `metric` for `run` over `slice_name`."""
        return next(s for s in self.slices if s.name == slice_name).means[run][metric]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every figure."""
        return {
            "metrics": list(self.metrics),
            "runs": list(self.runs),
            "baseline": self.baseline,
            "stat_test": self.stat_test,
            "max_p": self.max_p,
            "skipped_without_positive_gain": self.skipped,
            "slices": {
                s.name: {
                    "n_queries": s.n_queries,
                    "means": _json_numbers(s.means),
                    "p_values": _json_numbers(s.p_values),
                }
                for s in self.slices
            },
        }

    def to_markdown(self, title: str | None = None) -> str:
        """One table per slice: a row per run, a column per metric; * marks p < max_p against the baseline."""
        lines = [f"### {title}", ""] if title else []
        for s in self.slices:
            lines += [f"**{s.name}** ({s.n_queries} requests)", ""]
            lines.append("| run | " + " | ".join(self.metrics) + " |")
            lines.append("|---|" + "---:|" * len(self.metrics))
            for run in self.runs:
                cells = []
                for metric in self.metrics:
                    value = s.means[run][metric]
                    p = s.p_values.get(run, {}).get(metric)
                    mark = "*" if p is not None and p < self.max_p else ""
                    cells.append(f"{value:.4f}{mark}")
                lines.append(
                    f"| {run}{' (baseline)' if run == self.baseline else ''} | " + " | ".join(cells) + " |"
                )
            lines.append("")
        if self.baseline:
            lines.append(
                f"\\* p < {self.max_p} against {self.baseline} (paired {self.stat_test} test, ranx)."
            )
        if self.skipped:
            lines.append(f"{self.skipped} requests without a positive gain were left out.")
        return "\n".join(lines).rstrip() + "\n"


def _json_numbers(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    # JSON has no NaN: the mean over an empty slice (or an undefined p-value) becomes null
    return {run: {m: (v if np.isfinite(v) else None) for m, v in row.items()} for run, row in table.items()}


def evaluate_runs(
    examples: Sequence[RankingExample],
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    slices: Mapping[str, set[str]] | None = None,
    baseline: str | None = None,
    stat_test: Literal["student", "fisher"] = "student",
    max_p: float = 0.05,
) -> EvaluationReport:
    """Evaluate each run (qid -> product -> score) on the examples' gains with ranx.

    `slices` names subsets of request ids (for example short vs long histories); "all" always comes first.
    With a `baseline` run, every other run gets a paired test per metric and slice (Student's t, or
    Fisher's randomization test with 1,000 permutations, both from ranx).
    """
    import warnings

    from numba.core.errors import NumbaTypeSafetyWarning
    from ranx import evaluate
    from ranx.statistical_tests import fisher_randomization_test, paired_student_t_test

    if stat_test not in ("student", "fisher"):
        raise ConfigError(f"stat_test must be 'student' or 'fisher', not {stat_test!r}")
    if baseline is not None and baseline not in runs:
        raise ConfigError(f"baseline run {baseline!r} is not among the runs {sorted(runs)}")
    if not runs:
        raise ConfigError("evaluate_runs needs at least one run")
    qrels = to_qrels(examples)
    qids = list(qrels.get_query_ids())
    skipped = len({e.qid for e in examples}) - len(qids)
    per_query: dict[str, dict[str, np.ndarray]] = {}
    for name, run in runs.items():
        if not qids:
            per_query[name] = {m: np.zeros(0) for m in metrics}
            continue
        with warnings.catch_warnings():
            # ranx casts its uint64 ids to int64 inside numba; harmless, and noisy
            warnings.simplefilter("ignore", NumbaTypeSafetyWarning)
            scores = evaluate(qrels, to_run(run, qids, name), list(metrics), return_mean=False)
        if len(metrics) == 1:
            # ranx returns the bare array, not a dict, for a single metric
            scores = {metrics[0]: scores}
        per_query[name] = {m: np.atleast_1d(np.asarray(scores[m], dtype=np.float64)) for m in metrics}

    position = {qid: i for i, qid in enumerate(qids)}
    chosen = {ALL: np.arange(len(qids))}
    for slice_name, members in (slices or {}).items():
        chosen[slice_name] = np.array(sorted(position[q] for q in members if q in position), dtype=np.int64)

    results = []
    for slice_name, rows in chosen.items():
        means = {
            run: {m: float(per_query[run][m][rows].mean()) if len(rows) else float("nan") for m in metrics}
            for run in runs
        }
        p_values: dict[str, dict[str, float]] = {}
        if baseline is not None and len(rows) > 1:
            for run in runs:
                if run == baseline:
                    continue
                p_values[run] = {}
                for m in metrics:
                    control, treatment = per_query[baseline][m][rows], per_query[run][m][rows]
                    if np.array_equal(control, treatment):
                        p_values[run][m] = 1.0
                    elif stat_test == "student":
                        p_values[run][m] = float(paired_student_t_test(control, treatment, max_p)[0])
                    else:
                        p_values[run][m] = float(
                            fisher_randomization_test(control, treatment, 1000, max_p, 42)[0]
                        )
        results.append(SliceResult(slice_name, len(rows), means, p_values))
    return EvaluationReport(
        metrics=tuple(metrics),
        runs=tuple(runs),
        slices=results,
        baseline=baseline,
        stat_test=stat_test,
        max_p=max_p,
        skipped=skipped,
    )


def rmse(pred: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray) -> float:
    """Root mean squared error between predictions and true values."""
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.size == 0:
        raise ConfigError(f"rmse needs two non-empty arrays of one shape, got {pred.shape} and {truth.shape}")
    return float(np.sqrt(np.mean((pred - truth) ** 2)))
