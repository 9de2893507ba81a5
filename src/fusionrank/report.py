"""The fusion report: every single signal and every fusion on the test split, per slice, with paired
significance against the best single signal, published figures beside ours, the cascade's k against
quality and latency, and a plot of NDCG@10 per method. Markdown + JSON + PNG.

All ranking metrics come from the ranx harness (`fusionrank.evaluation.evaluate_runs`); fusions are scored
by `fusion.score_candidates`, the function the server calls, and evaluated in the order it returns.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusionrank.champion import frame_run
from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError, DataError
from fusionrank.evaluation import ALL, EvaluationReport, evaluate_runs
from fusionrank.evaluation import rmse as rmse_of
from fusionrank.fusion import (
    SIGNAL_PREFIX,
    FusionModel,
    best_single_signal,
    score_candidates,
    weights_summary,
)

REPORT_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20", "recall@10", "recall@20", "mrr")
HEADLINE = "ndcg@10"
FUSION_PREFIX = "fusion:"
CASCADE_KS = (5, 10, 20, 50)
LATENCY_REQUESTS = 200
MARKDOWN_FILE = "report.md"
JSON_FILE = "report.json"
PLOT_FILE = "ndcg10.png"

# Published figures, quoted as their sources give them (fractions here, percent in the papers).
PUBLISHED: dict[str, dict[str, Any]] = {
    "amazon-games": {
        "metric": "ndcg@10",
        "source": (
            "Hou et al., 'Large Language Models are Zero-Shot Rankers for Recommender Systems' (ECIR 2024), "
            "Games: the held-out item among 20 candidates (it plus 19 random items)"
        ),
        "values": {
            "Pop (LLMRank table)": 0.5296,
            "BPR-MF (LLMRank table)": 0.6627,
            "SASRec (LLMRank table)": 0.7592,
        },
    },
    "homedepot": {
        "metric": "rmse",
        "source": "Kaggle Home Depot Product Search Relevance (2016), relevance on the 1-3 scale",
        "values": {"Kaggle winning team": 0.431, "Kaggle field (typical)": 0.53},
    },
}


@dataclass
class DatasetReport:
    """Every figure of one dataset's report."""

    dataset: str
    evaluation: EvaluationReport
    baseline: str
    baseline_chosen_on: str
    fusions: dict[str, str]
    cascade_sweep: list[dict[str, float]] = field(default_factory=list)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    rmse: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def published(self) -> dict[str, Any] | None:
        return PUBLISHED.get(self.dataset)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every figure."""
        return {
            "dataset": self.dataset,
            "baseline": self.baseline,
            "baseline_chosen_on": self.baseline_chosen_on,
            "evaluation": self.evaluation.to_dict(),
            "fusions": self.fusions,
            "cascade_sweep": self.cascade_sweep,
            "latency_ms": self.latency,
            "rmse": self.rmse,
            "published": self.published,
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        """The dataset's section of the report."""
        ev = self.evaluation
        lines = [f"## {self.dataset}", ""]
        lines.append(
            f"Test split: {ev.slices[0].n_queries} requests with a relevant product"
            + (f" ({ev.skipped} without one left out)" if ev.skipped else "")
            + f". Best single signal (chosen on the {self.baseline_chosen_on} split): **{self.baseline}**."
        )
        lines.append("")
        lines.append(ev.to_markdown(title="Every signal and fusion, per slice").rstrip())
        lines += ["", *self._significance_table(), *self._published_section()]
        published = self.published
        if self.rmse and (published is None or published["metric"] != "rmse"):  # else listed beside them
            lines += ["", "### Regression head (RMSE, lower is better)", "", "| model | RMSE |", "|---|---:|"]
            lines += [f"| {name} (ours) | {value:.4f} |" for name, value in self.rmse.items()]
        if self.cascade_sweep:
            lines += ["", *self._cascade_section()]
        if self.latency:
            lines += ["", "### Fusion scoring latency per request (signals precomputed)", ""]
            lines += ["| method | requests | p50 ms | p95 ms |", "|---|---:|---:|---:|"]
            for name, row in self.latency.items():
                lines.append(
                    f"| {name} | {row['requests']:.0f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} |"
                )
        lines += ["", "### Fitted fusions", ""]
        lines += [f"- {name}: {summary}" for name, summary in self.fusions.items()]
        if self.notes:
            lines += ["", "### Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def _significance_table(self) -> list[str]:
        ev = self.evaluation
        whole = ev.slices[0]
        lines = [
            f"### Against {self.baseline} ({HEADLINE}, all requests)",
            "",
            f"| run | {HEADLINE} | gain | p-value ({ev.stat_test}) |",
            "|---|---:|---:|---:|",
        ]
        base = whole.means[self.baseline][HEADLINE]
        for run in ev.runs:
            if run == self.baseline:
                continue
            value = whole.means[run][HEADLINE]
            p = whole.p_values.get(run, {}).get(HEADLINE)
            shown = "n/a" if p is None else f"{p:.3g}"
            lines.append(f"| {run} | {value:.4f} | {value - base:+.4f} | {shown} |")
        return lines

    def _published_section(self) -> list[str]:
        published = self.published
        if published is None:
            return []
        lines = ["", "### Published figures beside ours", "", f"Source: {published['source']}.", ""]
        if published["metric"] == HEADLINE:
            whole = self.evaluation.slices[0]
            lines += [f"| method | {HEADLINE} (%) |", "|---|---:|"]
            lines += [f"| {name} | {100 * value:.2f} |" for name, value in published["values"].items()]
            lines += [
                f"| {run} (ours) | {100 * whole.means[run][HEADLINE]:.2f} |" for run in self.evaluation.runs
            ]
        else:
            lines += [f"| model | {published['metric'].upper()} |", "|---|---:|"]
            lines += [f"| {name} | {value:.3f} |" for name, value in published["values"].items()]
            lines += [f"| {name} (ours) | {value:.4f} |" for name, value in self.rmse.items()]
            if not self.rmse:
                lines.append("| ours | not measured in this run |")
        return lines

    def _cascade_section(self) -> list[str]:
        lines = [
            "### Cascade: k against quality and latency",
            "",
            "BERT scores k candidates per request, so its cost grows with k; the fusion's own cost does not.",
            "",
            "| k | ndcg@10 | recall@10 | BERT pairs / request | fusion p50 ms | est. BERT ms / request |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.cascade_sweep:
            bert_ms = row.get("est_bert_ms")
            shown = "n/a" if bert_ms is None else f"{bert_ms:.1f}"
            lines.append(
                f"| {row['k']:.0f} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | "
                f"{row['bert_pairs_per_request']:.1f} | {row['p50_ms']:.2f} | {shown} |"
            )
        return lines


def dataset_report(
    dataset: str,
    test_frame: pd.DataFrame,
    models: Mapping[str, FusionModel],
    examples: Sequence[RankingExample] | None = None,
    slices: Mapping[str, set[str]] | None = None,
    valid_frame: pd.DataFrame | None = None,
    metrics: Sequence[str] = REPORT_METRICS,
    cascade_ks: Sequence[int] = CASCADE_KS,
    bert_pairs_per_second: float | None = None,
    rmse: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> DatasetReport:
    """Evaluate every `s_*` column and every fusion of `models` on the test frame.

    `examples` carry every judged product (so recall counts what the candidates missed); without them the
    frame's own gains are used. The baseline (best single signal by NDCG@10) is chosen on `valid_frame`
    when given, else on the test frame. `bert_pairs_per_second`, when measured, turns the cascade's BERT
    pairs per request into an estimated latency.
    """
    signals = [c for c in test_frame.columns if c.startswith(SIGNAL_PREFIX)]
    if not signals:
        raise DataError(
            f"test frame has no signal columns ({SIGNAL_PREFIX}*); it has {list(test_frame.columns)}"
        )
    if HEADLINE not in metrics:
        raise ConfigError(f"the report's metrics must include {HEADLINE!r}, got {list(metrics)}")
    if examples is None:
        examples = _frame_examples(test_frame)
    runs = {c.removeprefix(SIGNAL_PREFIX): frame_run(test_frame, test_frame[c]) for c in signals}
    for kind, model in models.items():
        runs[f"{FUSION_PREFIX}{kind}"] = _fused_run(model, test_frame)
    chooser = valid_frame if valid_frame is not None else test_frame
    baseline = best_single_signal(chooser, signals, HEADLINE).removeprefix(SIGNAL_PREFIX)
    evaluation = evaluate_runs(examples, runs, list(metrics), slices=slices, baseline=baseline)
    report = DatasetReport(
        dataset=dataset,
        evaluation=evaluation,
        baseline=baseline,
        baseline_chosen_on="validation" if valid_frame is not None else "test",
        fusions={f"{FUSION_PREFIX}{kind}": weights_summary(m) for kind, m in models.items()},
        rmse={k: float(v) for k, v in (rmse or {}).items()},
        notes=list(notes),
    )
    report.latency = {f"{FUSION_PREFIX}{k}": _latency(m, test_frame) for k, m in models.items()}
    cascade = models.get("cascade")
    if cascade is not None and cascade_ks:
        report.cascade_sweep = _cascade_sweep(
            cascade, test_frame, examples, cascade_ks, bert_pairs_per_second
        )
    return report


HEAD_SIGNAL = "s_bert"


def head_rmse(test: pd.DataFrame, qrels: pd.DataFrame, valid_qrels: pd.DataFrame) -> dict[str, float]:
    """Kaggle's Home Depot metric on our split: RMSE on the 1-3 relevance scale over the test split's judged
    (query, product) pairs that are among the candidates (the cross-encoder scores only those).

    The cross-encoder trains by regression on gains (relevance - 1), so its score + 1, clipped to 1-3, is its
    relevance prediction. Beside it, the same pairs predicted by the mean judged relevance of the validation
    split, the constant a model must beat. Empty when no judged pair has a score.
    """
    from fusionrank.steps import SEARCH_GAIN_OFFSET  # gains are relevance - this

    judged = qrels.assign(qid=qrels["qid"].astype(str), product_id=qrels["product_id"].astype(str))
    scored = test.assign(qid=test["qid"].astype(str), product_id=test["product_id"].astype(str))
    pairs = scored.merge(judged, on=["qid", "product_id"], suffixes=("", "_judged"))
    pairs = pairs[pairs[HEAD_SIGNAL].notna()]
    if pairs.empty or valid_qrels.empty:
        return {}
    truth = pairs["gain_judged"].to_numpy(dtype=float) + SEARCH_GAIN_OFFSET
    predicted = np.clip(pairs[HEAD_SIGNAL].to_numpy(dtype=float) + SEARCH_GAIN_OFFSET, 1.0, 3.0)
    mean = float(valid_qrels["gain"].mean()) + SEARCH_GAIN_OFFSET
    return {
        f"cross-encoder regression head, {len(pairs)} judged test pairs": rmse_of(predicted, truth),
        "validation-mean relevance, same pairs": rmse_of(np.full_like(truth, mean), truth),
    }


def report_from_run(
    dataset: str,
    scored_dir: str | Path,
    fusion_dir: str | Path,
    cascade_ks: Sequence[int] = CASCADE_KS,
    bert_pairs_per_second: float | None = None,
    rmse: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> DatasetReport:
    """The report of one pipeline run, from its candidate frames (valid/test, contexts, qrels) and fusions."""
    from fusionrank.champion import read_split_frames, slices_of
    from fusionrank.ranker import examples_from_frames

    scored_dir, fusion_dir = Path(scored_dir), Path(fusion_dir)
    test, contexts, qrels = read_split_frames(scored_dir, "test")
    valid, _, valid_qrels = read_split_frames(scored_dir, "valid")
    info = scored_dir / "frames.json"
    search = info.is_file() and json.loads(info.read_text()).get("mode") == "search"
    if rmse is None and search and HEAD_SIGNAL in test.columns:
        rmse = head_rmse(test, qrels, valid_qrels)
    info_path = fusion_dir / "fusion.json"
    if not info_path.is_file():
        raise DataError(f"{fusion_dir}: no fusion.json listing the fitted fusions")
    kinds = json.loads(info_path.read_text())["fusions"]
    models = {kind: FusionModel.load(fusion_dir / kind) for kind in kinds}
    return dataset_report(
        dataset,
        test,
        models,
        examples=examples_from_frames(test, contexts, qrels),
        slices=slices_of(contexts),
        valid_frame=valid,
        cascade_ks=cascade_ks,
        bert_pairs_per_second=bert_pairs_per_second,
        rmse=rmse,
        notes=notes,
    )


def write_report(
    reports: Sequence[DatasetReport], out_dir: str | Path, title: str | None = None
) -> dict[str, Path]:
    """Write report.md, report.json and ndcg10.png under `out_dir`; return their paths."""
    if not reports:
        raise ConfigError("write_report needs at least one dataset report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / MARKDOWN_FILE, "json": out / JSON_FILE, "plot": out / PLOT_FILE}
    heading = title or "fusionrank: single signals and fusions on the test split"
    body = [f"# {heading}", "", f"![NDCG@10 per method]({PLOT_FILE})", ""]
    body += [r.to_markdown() for r in reports]
    paths["markdown"].write_text("\n".join(body))
    data = {"title": heading, "datasets": {r.dataset: r.to_dict() for r in reports}}
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    plot_ndcg(reports, paths["plot"])
    return paths


def plot_ndcg(reports: Sequence[DatasetReport], path: str | Path) -> Path:
    """One panel per dataset: NDCG@10 of every run (fusions highlighted), published NDCG@10 figures beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.8), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        whole = report.evaluation.slices[0]
        names = list(report.evaluation.runs)
        values = [whole.means[name][HEADLINE] for name in names]
        colors = ["tab:blue" if n.startswith(FUSION_PREFIX) else "tab:gray" for n in names]
        published = report.published
        if published is not None and published["metric"] == HEADLINE:
            for name, value in published["values"].items():
                names.append(name)
                values.append(value)
                colors.append("tab:orange")
        labels = [f"{n} (baseline)" if n == report.baseline else n for n in names]
        positions = np.arange(len(names))
        ax.barh(positions, values, color=colors)
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("NDCG@10 (test split)")
        ax.set_title(report.dataset)
        for y, value in zip(positions, values, strict=True):
            ax.text(min(value + 0.01, 0.9), y, f"{value:.3f}", va="center", fontsize=8)
    fig.text(0.01, 0.01, "grey: single signals, blue: fusions, orange: published", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fused_run(model: FusionModel, frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The served order of each request as a run: the score is minus the rank, so no tie is left."""
    scored = score_candidates(model, frame)
    return frame_run(scored, -scored["rank"].to_numpy(dtype=float))


def _frame_examples(frame: pd.DataFrame) -> list[RankingExample]:
    """Examples from the frame alone: the request id stands in for the context, gains are the frame's."""
    examples = []
    for qid, rows in frame.groupby("qid", sort=False):
        gains = {str(p): float(g) for p, g in zip(rows["product_id"], rows["gain"], strict=True) if g > 0}
        examples.append(RankingExample(Context(query=str(qid)), [str(p) for p in rows["product_id"]], gains))
    return examples


def _requests(frame: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    qids = pd.unique(frame["qid"])[:n]
    return [rows for _, rows in frame[frame["qid"].isin(set(qids))].groupby("qid", sort=False)]


def _latency(model: FusionModel, frame: pd.DataFrame, n: int = LATENCY_REQUESTS) -> dict[str, float]:
    """Wall time of `score_candidates` on one request at a time, as the server calls it."""
    timings = []
    for rows in _requests(frame, n):
        start = time.perf_counter()
        score_candidates(model, rows)
        timings.append(1000 * (time.perf_counter() - start))
    return {
        "requests": float(len(timings)),
        "p50_ms": float(np.percentile(timings, 50)),
        "p95_ms": float(np.percentile(timings, 95)),
    }


def _cascade_sweep(
    cascade: FusionModel,
    frame: pd.DataFrame,
    examples: Sequence[RankingExample],
    ks: Sequence[int],
    bert_pairs_per_second: float | None,
) -> list[dict[str, float]]:
    sizes = frame.groupby("qid", sort=False).size().to_numpy()
    variants = {int(k): dataclasses.replace(cascade, k=int(k)) for k in ks}
    runs = {f"k={k}": _fused_run(model, frame) for k, model in variants.items()}
    evaluation = evaluate_runs(examples, runs, [HEADLINE, "recall@10"])
    rows = []
    for k, model in variants.items():
        pairs = float(np.minimum(sizes, k).mean())
        latency = _latency(model, frame, n=min(LATENCY_REQUESTS, 50))
        rows.append(
            {
                "k": float(k),
                HEADLINE: evaluation.mean(f"k={k}", HEADLINE, ALL),
                "recall@10": evaluation.mean(f"k={k}", "recall@10", ALL),
                "bert_pairs_per_request": pairs,
                "p50_ms": latency["p50_ms"],
                "est_bert_ms": None if not bert_pairs_per_second else 1000 * pairs / bert_pairs_per_second,
            }
        )
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
