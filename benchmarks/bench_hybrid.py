"""The measured table of the hybrid ranker (issue #11): quality and `/rank` latency of each signal stack and
cross-encoder budget, on finished pipeline runs, in one go.

    .venv/bin/python benchmarks/bench_hybrid.py --run RUN_DIR [--run RUN_DIR2 ...] [--latency/--no-latency]
        [--requests N] [--json OUT]

RUN_DIR is a finished kfp.local run folder of the training pipeline (`fusionrank run --local --home H`
writes H/runs/fusionrank-training-<timestamp>). Per run (one dataset), on the TEST split, every fusion
fitted on the VALID frame only:

1. traditional alone: a weighted fusion (`fit_weighted`) over the s_*/f_* columns but s_bert and s_dense,
   on the frames before the dense step (`finetune-bert/scored_frames`: BM25 / protocol candidates);
2. + bi-encoder: the same plus s_dense, on the dense frames (`finetune-biencoder/dense_frames`, hybrid
   candidates for search);
3. + cross-encoder on each request's top k (k in 0, 10, 20, 50, all): the run's selected fusion
   (`fit-fusion`) through `fusion.score_with_rerank`, with the frames' fp32 s_bert and s_dense;
4. int8: the same k with s_bert and s_dense recomputed by the bundle's int8 encoders (ONNX Runtime,
   `Ranker.load(bundle, int8=True).frame(..., shortlist=False)`) on the same candidates (the hybrid
   candidates a server's int8 context encoder retrieves may differ from the frames').

NDCG@10 comes from the evaluation harness (`evaluation.evaluate_runs`, ranx) over every judged product
(the qrels), so a relevant product a row's candidates missed counts against it. Each row has a paired
Student's t-test (ranx, per-request NDCG@10) against the row above it; an int8 row against the fp32 row
with the same k. "candidate recall" is the share of each request's judged relevant products among the
row's candidates (mean over requests; every candidate, i.e. up to 100 + hybrid_k for the hybrid frames).

Latency (unless --no-latency): for each rerank_k x int8 on/off, the run's Bento is served with
`bentoml serve` on 127.0.0.1 (FUSIONRANK_RERANK_K, FUSIONRANK_INT8, BENTOML_HOME = RUN_DIR/../../bentoml)
and loaded from 10 concurrent clients with the test split's requests (search: the query alone, so the
server retrieves its hybrid candidates; recommendation: user, history and the protocol's candidate list,
or with --history store the user and candidates only, so the server reads the history from the feature
store and the bi-encoder's precomputed vector of it), k=10, after a warm-up. Each phase is bounded by
--requests and --max-seconds, and the sweep by --budget-minutes per dataset. The load average is printed
with every figure: the machine is shared.

The default CPU budget chosen: the config with the best NDCG@10 whose p99 is under --p99-target-ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
K_VALUES: tuple[int | None, ...] = (0, 10, 20, 50, None)  # None: every candidate
METRIC = "ndcg@10"
STAT_TEST = "student"
EXCLUDED = ("s_bert", "s_dense")
# FUSIONRANK_RERANK_K for "every candidate" when the bundle's own rerank_k_cpu is set (MAX_CANDIDATES)
ALL_CANDIDATES_K = 500
MAX_HISTORY = 200  # serving_logic.MAX_HISTORY: a longer history keeps its newest items
GENERATOR_KEY = re.compile(r"^(valid|test)_recall(?:@|_at_)(\d+)_(.+)$")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f}"


def k_label(k: int | None) -> str:
    return "all" if k is None else str(k)


# -- the run folder ------------------------------------------------------------------------------------


@dataclass
class RunPaths:
    """Where a finished kfp.local run keeps what the benchmark reads."""

    run: Path
    scored: Path  # finetune-bert/scored_frames: candidates before the dense step, with s_bert
    dense: Path  # finetune-biencoder/dense_frames: + s_dense (+ hybrid candidates for search)
    biencoder_output: Path
    fusion: Path
    bundle: Path | None
    bento: str | None
    bentoml_home: Path
    bento_source: str = ""

    @classmethod
    def of(cls, run: Path) -> RunPaths:
        run = run.resolve()
        paths = cls(
            run=run,
            scored=run / "finetune-bert" / "scored_frames",
            dense=run / "finetune-biencoder" / "dense_frames",
            biencoder_output=run / "finetune-biencoder" / "executor_output.json",
            fusion=run / "fit-fusion" / "fusion",
            bundle=run / "package" / "bundle",
            bento=None,
            bentoml_home=run.parent.parent / "bentoml",
        )
        for needed in (paths.scored, paths.dense, paths.fusion):
            if not needed.is_dir():
                raise SystemExit(
                    f"{run}: no {needed.relative_to(run)} (not a finished run of this pipeline?)"
                )
        if not (paths.bundle / "manifest.json").is_file():
            paths.bundle = None
        package_output = run / "package" / "executor_output.json"
        if package_output.is_file():
            output = json.loads(package_output.read_text())
            paths.bento = (output.get("parameterValues") or {}).get("Output")
            if not paths.bento:
                for artifact in (output.get("artifacts") or {}).get("bundle", {}).get("artifacts", []):
                    paths.bento = (artifact.get("metadata") or {}).get("bento") or paths.bento
            paths.bento_source = "the package step's output"
        elif paths.bundle is not None:
            paths.bento = paths.built_bento()
            if paths.bento:
                paths.bento_source = (
                    "the package step did NOT finish (no package/executor_output.json): the Bento it built "
                    "around this run's bundle, found in the run's BentoML home"
                )
        return paths

    def built_bento(self) -> str | None:
        """The newest Bento in the run's BentoML home whose model holds this run's bundle (same manifest):
        what a package step that failed after building (e.g. its contract check) left behind."""
        import yaml

        manifest = json.loads((self.bundle / "manifest.json").read_text())
        found = []
        for path in (self.bentoml_home / "bentos").glob("*/*/bento.yaml"):
            spec = yaml.safe_load(path.read_text())
            tags = [
                m.get("tag", "")
                for service in spec.get("services") or []
                for m in service.get("models") or []
            ]
            for tag in tags:
                name, _, version = tag.partition(":")
                model_manifest = self.bentoml_home / "models" / name / version / "bundle" / "manifest.json"
                if model_manifest.is_file() and json.loads(model_manifest.read_text()) == manifest:
                    found.append((str(spec.get("creation_time")), f"{spec['name']}:{spec['version']}"))
        return max(found)[1] if found else None

    def rebuild_bento(self) -> None:
        """Serve this run's model with the current serving code: `packaging.build_bento` around the model
        of the run's Bento, in the run's BentoML home (a subprocess, so that home is BentoML's own)."""
        import yaml

        if not self.bento:
            raise SystemExit(f"{self.run}: no Bento to rebuild (the package step did not build one)")
        name, _, version = self.bento.partition(":")
        spec = yaml.safe_load((self.bentoml_home / "bentos" / name / version / "bento.yaml").read_text())
        model = next(m["tag"] for service in spec["services"] for m in service.get("models") or [])
        code = "from fusionrank.packaging import build_bento; import sys; print(build_bento(sys.argv[1]).tag)"
        done = subprocess.run(
            [sys.executable, "-c", code, model],
            env={**os.environ, "BENTOML_HOME": str(self.bentoml_home), "BENTOML_DO_NOT_TRACK": "true"},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise SystemExit(f"rebuilding the Bento of {model} failed:\n{done.stderr[-3000:]}")
        self.bento = done.stdout.strip().splitlines()[-1]
        self.bento_source = f"rebuilt with the current code around {model} (--current-code)"

    def source(self) -> str:
        """The dataset the run ingested (its pipeline arguments, else the mode)."""
        manifest = self.run / "ingest" / "dataset" / "manifest.json"
        if manifest.is_file():
            source = json.loads(manifest.read_text()).get("source")
            if source:
                return str(source)
        return str(json.loads((self.dense / "frames.json").read_text()).get("mode", "?"))


def _task_metrics(path: Path) -> dict[str, float]:
    """The metadata of a task's `metrics` artifact (kfp.local writes it into executor_output.json)."""
    if not path.is_file():
        return {}
    output = json.loads(path.read_text())
    for artifact in (output.get("artifacts") or {}).get("metrics", {}).get("artifacts", []):
        return dict(artifact.get("metadata") or {})
    return {}


def generator_recall(paths: RunPaths) -> dict[str, dict[str, float]]:
    """recall@k per candidate generator and split, as the bi-encoder step measured it."""
    table: dict[str, dict[str, float]] = {}
    for key, value in _task_metrics(paths.biencoder_output).items():
        match = GENERATOR_KEY.match(key)
        if match:
            which, k, name = match.groups()
            table.setdefault(f"{name.replace('_at_', '@')} (recall@{k})", {})[which] = float(value)
    return table


# -- quality --------------------------------------------------------------------------------------------


def ranked_run(scored: pd.DataFrame) -> dict[str, dict[str, float]]:
    """A run from a scored frame's `rank` column, which is authoritative (the two stages of
    `score_with_rerank` have scores on different scales)."""
    from fusionrank.champion import frame_run

    return frame_run(scored, -scored["rank"].to_numpy(dtype=float))


def candidate_recall(frame: pd.DataFrame, qrels: pd.DataFrame, qids: Sequence[str]) -> dict[str, float]:
    """Mean over `qids` (requests with a judged relevant product) of the share of relevant products that are
    among the frame's candidates; and the mean number of candidates per request."""
    from fusionrank.evaluation import GAIN_SCALE

    relevant = qrels[np.round(qrels["gain"].astype(float) * GAIN_SCALE) > 0]
    relevant_by_qid = relevant.groupby(relevant["qid"].astype(str))["product_id"].agg(
        lambda s: set(s.astype(str))
    )
    candidates = frame.groupby(frame["qid"].astype(str))["product_id"].agg(lambda s: set(s.astype(str)))
    shares, sizes = [], []
    for qid in qids:
        wanted = relevant_by_qid.get(qid, set())
        if not wanted:
            continue
        have = candidates.get(qid, set())
        shares.append(len(wanted & have) / len(wanted))
        sizes.append(len(have))
    return {
        "recall": float(np.mean(shares)) if shares else float("nan"),
        "mean_candidates": float(np.mean(sizes)) if sizes else float("nan"),
        "requests": len(shares),
    }


def _columns(frame: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    columns = [c for c in frame.columns if c.startswith(("s_", "f_")) and c not in EXCLUDED]
    return [*columns, *[c for c in extra if c in frame.columns]]


def signal_diffs(recomputed: pd.DataFrame, reference: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per s_* column: max and mean abs difference, and rows where exactly one side is NaN."""
    out: dict[str, dict[str, float]] = {}
    for column in [c for c in reference.columns if c.startswith("s_") and c in recomputed.columns]:
        a = recomputed[column].to_numpy(dtype=float)
        b = reference[column].to_numpy(dtype=float)
        both = ~np.isnan(a) & ~np.isnan(b)
        diff = np.abs(a[both] - b[both])
        out[column] = {
            "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
            "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
            "nan_mismatch": int((np.isnan(a) != np.isnan(b)).sum()),
        }
    return out


def recompute_frame(
    bundle: Path, test: pd.DataFrame, contexts: pd.DataFrame, qrels: pd.DataFrame, int8: bool
):
    """The test frame with every signal recomputed by the bundle (BERT on every candidate), rows aligned
    with `test`."""
    from fusionrank.ranker import FEATURE_PREFIX, Ranker, examples_from_frames

    ranker = Ranker.load(bundle, int8=int8)
    examples = examples_from_frames(test, contexts, qrels)
    features = test[["qid", "product_id", *[c for c in test.columns if c.startswith(FEATURE_PREFIX)]]]
    frame = ranker.frame(examples, features, shortlist=False)
    same = (frame["qid"].astype(str).to_numpy() == test["qid"].astype(str).to_numpy()).all() and (
        frame["product_id"].astype(str).to_numpy() == test["product_id"].astype(str).to_numpy()
    ).all()
    if len(frame) != len(test) or not same:
        raise SystemExit("the bundle's recomputed frame is not aligned with the test frame")
    return frame


def evaluate_quality(paths: RunPaths, int8: bool = True, fp32_check_queries: int = 10) -> dict[str, Any]:
    """Every quality row of one run: NDCG@10 on test, p-values, candidate recall; int8 rows by the bundle."""
    from fusionrank.champion import frame_run, read_split_frames
    from fusionrank.evaluation import evaluate_runs
    from fusionrank.fusion import (
        FusionModel,
        fit_weighted,
        score_candidates,
        score_with_rerank,
        weights_summary,
    )
    from fusionrank.ranker import examples_from_frames

    started = time.perf_counter()
    pre_valid = pd.read_parquet(paths.scored / "valid.parquet")
    pre_test, _, _ = read_split_frames(paths.scored, "test")
    dense_valid = pd.read_parquet(paths.dense / "valid.parquet")
    dense_test, contexts, qrels = read_split_frames(paths.dense, "test")
    examples = examples_from_frames(dense_test, contexts, qrels)
    info = json.loads((paths.fusion / "fusion.json").read_text())
    selected_kind = info["selected"]
    selected = FusionModel.load(paths.fusion / selected_kind)

    traditional = _columns(pre_valid)
    with_dense = _columns(dense_valid, extra=("s_dense",))
    models = {
        "traditional": fit_weighted(pre_valid, traditional),
        "bi-encoder": fit_weighted(dense_valid, with_dense),
    }
    rows: list[dict[str, Any]] = [
        {
            "name": "1 traditional alone (weighted; BM25/protocol candidates)",
            "key": "traditional",
            "frame": "pre-dense",
            "fusion": weights_summary(models["traditional"]),
            "run": ranked_run(score_candidates(models["traditional"], pre_test)),
            "candidates": candidate_recall(pre_test, qrels, [e.qid for e in examples]),
            "compare_with": None,
        },
        {
            "name": "2 + bi-encoder (weighted + s_dense"
            + ("; hybrid candidates)" if _is_search(paths) else ")"),
            "key": "bi-encoder",
            "frame": "dense",
            "fusion": weights_summary(models["bi-encoder"]),
            "run": ranked_run(score_candidates(models["bi-encoder"], dense_test)),
            "candidates": candidate_recall(dense_test, qrels, [e.qid for e in examples]),
            "compare_with": "traditional",
        },
    ]
    dense_recall = rows[1]["candidates"]
    previous = "bi-encoder"
    for k in K_VALUES:
        key = f"fp32 k={k_label(k)}"
        rows.append(
            {
                "name": f"3 + cross-encoder top {k_label(k)}, fp32",
                "key": key,
                "frame": "dense",
                "rerank_k": k,
                "int8": False,
                "fusion": weights_summary(selected),
                "run": ranked_run(score_with_rerank(selected, dense_test, k)),
                "candidates": dense_recall,
                "compare_with": previous,
            }
        )
        previous = key
    recomputed: dict[str, Any] = {}
    if int8 and paths.bundle is not None:
        _log(f"[{load_average()}] recomputing s_bert/s_dense with the bundle's int8 encoders ...")
        begin = time.perf_counter()
        frame8 = recompute_frame(paths.bundle, dense_test, contexts, qrels, int8=True)
        recomputed["int8_seconds"] = round(time.perf_counter() - begin, 1)
        recomputed["int8_vs_frames"] = signal_diffs(frame8, dense_test)
        for k in K_VALUES:
            rows.append(
                {
                    "name": f"4 + cross-encoder top {k_label(k)}, int8",
                    "key": f"int8 k={k_label(k)}",
                    "frame": "dense, s_bert/s_dense recomputed int8",
                    "rerank_k": k,
                    "int8": True,
                    "fusion": weights_summary(selected),
                    "run": ranked_run(score_with_rerank(selected, frame8, k)),
                    "candidates": dense_recall,
                    "compare_with": f"fp32 k={k_label(k)}",
                }
            )
        if fp32_check_queries > 0:
            # the same path in fp32 on a few requests: separates int8's effect from any path difference
            qids = list(dict.fromkeys(dense_test["qid"].astype(str)))[:fp32_check_queries]
            part = dense_test[dense_test["qid"].astype(str).isin(set(qids))].reset_index(drop=True)
            frame32 = recompute_frame(paths.bundle, part, contexts, qrels, int8=False)
            recomputed["fp32_check_requests"] = len(qids)
            recomputed["fp32_recomputed_vs_frames"] = signal_diffs(frame32, part)
    elif int8:
        recomputed["skipped"] = "no package/bundle in this run: int8 rows skipped"
    # each encoder alone, fp32 (the frames) and int8: what int8 does to a signal whatever its fused weight
    single: list[dict[str, Any]] = []
    for column in ("s_bert", "s_dense"):
        if column not in dense_test.columns:
            continue
        fp32_run = frame_run(dense_test, dense_test[column])
        single.append({"signal": column, "int8": False, "run": fp32_run, "compare_with": None})
        if "int8_vs_frames" in recomputed:
            single.append(
                {
                    "signal": column,
                    "int8": True,
                    "run": frame_run(frame8, frame8[column]),
                    "compare_with": f"{column} fp32",
                }
            )
    for item in single:
        item["key"] = f"{item['signal']} {'int8' if item['int8'] else 'fp32'}"
    single_runs = {item["key"]: item["run"] for item in single}

    runs = {row["key"]: row["run"] for row in rows} | single_runs
    report = evaluate_runs(examples, runs, (METRIC,), stat_test=STAT_TEST)
    for row in [*rows, *single]:
        row["ndcg@10"] = report.mean(row["key"], METRIC)
        row["p_value"] = None
        if row["compare_with"] is not None:
            pair = {row["compare_with"]: runs[row["compare_with"]], row["key"]: runs[row["key"]]}
            paired = evaluate_runs(
                examples, pair, (METRIC,), baseline=row["compare_with"], stat_test=STAT_TEST
            )
            row["p_value"] = paired.slices[0].p_values[row["key"]][METRIC]
    pipeline_eval = _task_metrics(paths.run / "evaluate" / "executor_output.json").get(METRIC)
    without_candidates = sorted(set(contexts["qid"].astype(str)) - {e.qid for e in examples})
    judged = {str(q) for q in qrels.loc[np.round(qrels["gain"].astype(float) * 100) > 0, "qid"]}
    for row in [*rows, *single]:
        del row["run"]
    weights = selected.weights if selected.kind == "weighted" else {}
    return {
        "selected_fusion": selected_kind,
        "selected_summary": weights_summary(selected),
        "fusion_signals": info.get("signals"),
        "traditional_columns": traditional,
        "bi_encoder_columns": with_dense,
        "test_requests": len(examples),
        "evaluated_requests": report.slices[0].n_queries,
        "left_out_without_positive_gain": report.skipped,
        "test_requests_without_candidates": len(without_candidates),
        "of_which_with_relevant_judgments": len(set(without_candidates) & judged),
        "pipeline_evaluate_ndcg@10_selected": pipeline_eval,
        "recomputed": recomputed,
        "rows": rows,
        "single_signals": single,
        "selected_weight_s_bert": weights.get("s_bert"),
        "selected_weight_s_dense": weights.get("s_dense"),
        "stat_test": f"paired Student's t-test (ranx), per-request {METRIC}",
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": load_average(),
    }


def _is_search(paths: RunPaths) -> bool:
    return json.loads((paths.dense / "frames.json").read_text()).get("mode") == "search"


# -- latency --------------------------------------------------------------------------------------------


def test_requests(paths: RunPaths, history_source: str) -> tuple[list[dict], dict[str, Any]]:
    """POST /rank bodies for the test split: search sends the query alone (the server retrieves hybrid
    candidates); recommendation sends user, history and the request's protocol candidate list, or with
    `history_source="store"` the user and candidates alone, so the server reads the history from the feature
    store (the user's latest, which includes the held-out event: a latency figure, not a quality one)."""
    from fusionrank.champion import read_split_frames

    frame, contexts, _ = read_split_frames(paths.dense, "test")
    search = _is_search(paths)
    candidates = frame.groupby(frame["qid"].astype(str), sort=False)["product_id"].agg(
        lambda s: [str(p) for p in s]
    )
    requests, truncated = [], 0
    for row in contexts.itertuples(index=False):
        qid = str(row.qid)
        if search:
            if row.query is None or pd.isna(row.query) or not str(row.query).strip():
                continue
            requests.append({"query": str(row.query), "k": 10})
        else:
            if qid not in candidates.index:
                continue
            history = [str(p) for p in row.history]
            truncated += len(history) > MAX_HISTORY
            body: dict[str, Any] = {"history": history[-MAX_HISTORY:], "candidates": candidates[qid], "k": 10}
            if row.user_id is not None and not pd.isna(row.user_id):
                body["user_id"] = str(row.user_id)
            if not body["history"] and "user_id" not in body:
                continue
            if history_source == "store":
                if "user_id" not in body:
                    continue
                del body["history"]
            requests.append(body)
    kind = "query only, server retrieves" if search else "user_id + history + protocol candidates"
    if not search and history_source == "store":
        kind = "user_id + protocol candidates, history from the store"
    return requests, {"requests": len(requests), "kind": kind, "histories_truncated": truncated}


def probe(url: str, requests: Sequence[dict]) -> dict[str, Any]:
    """A few synchronous requests: degraded or not (and why), retrieved, results returned, model tag."""
    import httpx

    answers = []
    for body in requests:
        response = httpx.post(f"{url}/rank", json=body, timeout=120)
        if response.status_code != 200:
            answers.append({"status": response.status_code, "text": response.text[:200]})
            continue
        data = response.json()
        answers.append(
            {
                "status": 200,
                "degraded": data.get("degraded"),
                "reasons": data.get("degraded_reasons"),
                "retrieved": data.get("retrieved"),
                "results": len(data.get("results", [])),
                "contributions": sorted((data.get("results") or [{}])[0].get("contributions", {})),
                # the cross-encoder's part in the returned top k: 0 everywhere when rerank_k is 0
                "bert_nonzero": sum(
                    1 for r in data.get("results", []) if r.get("contributions", {}).get("bert", 0) != 0
                ),
                "model": (data.get("model") or {}).get("tag"),
            }
        )
    ok = [a for a in answers if a.get("status") == 200]
    return {
        "probed": len(answers),
        "ok": len(ok),
        "degraded": sum(bool(a["degraded"]) for a in ok),
        "reasons": sorted({r for a in ok for r in (a["reasons"] or [])}),
        "retrieved": sum(bool(a["retrieved"]) for a in ok),
        "results_per_request": sorted({a["results"] for a in ok}),
        "contributions": ok[0]["contributions"] if ok else [],
        "results_with_bert_contribution": sum(a["bert_nonzero"] for a in ok),
        "model": ok[0]["model"] if ok else None,
        "errors": [a for a in answers if a.get("status") != 200][:2],
    }


def evaluated_retrieve_k(paths: RunPaths) -> int | None:
    """For search, the BM25 depth the run's evaluation frames used (its `candidates_k`: the longest BM25
    list of the frames before the dense step), so the server retrieves what was evaluated: the server's
    own default is 100, whatever `candidates_k` the run had. None for recommendation (candidates sent)."""
    if not _is_search(paths):
        return None
    frame = pd.read_parquet(paths.scored / "test.parquet", columns=["qid"])
    return int(frame.groupby("qid").size().max()) if len(frame) else None


def latency_sweep(paths: RunPaths, args: argparse.Namespace) -> dict[str, Any]:
    """p50/p99 and throughput of each (rerank_k, int8) config, one `bentoml serve` per config."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serving import load, start_server, stop_server, wrk_load

    if not paths.bento:
        return {"skipped": "no Bento tag in package/executor_output.json"}
    if not paths.bentoml_home.is_dir():
        return {"skipped": f"no BentoML home at {paths.bentoml_home}"}
    manifest = json.loads((paths.bundle / "manifest.json").read_text()) if paths.bundle else {}
    serving = manifest.get("serving") or {}
    requests, request_info = test_requests(paths, args.history)
    if not requests:
        return {"skipped": "no test requests"}
    retrieve_k = args.retrieve_k if args.retrieve_k is not None else evaluated_retrieve_k(paths)
    # the measured phase starts where the warm-up stopped, so the warm-up's requests are not sent first again
    shift = args.warmup % len(requests)
    measured = requests[shift:] + requests[:shift]
    for key in ("FUSIONRANK_RERANK_K", "FUSIONRANK_INT8"):
        os.environ.pop(key, None)  # each config sets its own; an inherited value must not leak in
    env = {
        "BENTOML_HOME": str(paths.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "FUSIONRANK_CONTEXT_CACHE": str(args.context_cache),
        "FUSIONRANK_WORKERS": str(args.workers),
    }
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    if retrieve_k:
        env["FUSIONRANK_RETRIEVE_K"] = str(retrieve_k)
    configs = [(int8, k) for int8 in (False, True) for k in K_VALUES]
    if args.only:
        configs = [(i, k) for i, k in configs if f"{'int8' if i else 'fp32'} k={k_label(k)}" in args.only]
    rows = []
    sweep_started = time.monotonic()
    budget = args.budget_minutes * 60
    logs = Path(tempfile.mkdtemp(prefix="bench-hybrid-"))
    for index, (int8, k) in enumerate(configs):
        left = budget - (time.monotonic() - sweep_started)
        per_config = left / (len(configs) - index)
        # what is left of the budget, shared among the configs still to run (server start-up ~30 s each)
        phase_limit = max(10.0, min(args.max_seconds, per_config - 30.0 - args.warmup_seconds))
        config_env = {**env, "FUSIONRANK_INT8": "on" if int8 else "off"}
        if k is not None:
            config_env["FUSIONRANK_RERANK_K"] = str(k)
            served_k = k
        elif serving.get("rerank_k_cpu") is not None:
            config_env["FUSIONRANK_RERANK_K"] = str(ALL_CANDIDATES_K)
            served_k = ALL_CANDIDATES_K
        else:
            served_k = None
        name = f"{'int8' if int8 else 'fp32'} k={k_label(k)}"
        _log(f"[{load_average()}] serving {paths.bento} with {name} (phase limit {phase_limit:.0f} s) ...")
        begin = time.monotonic()
        process, url = start_server(paths.bento, config_env, logs / f"serve-{index}.log")
        startup = time.monotonic() - begin
        try:
            probed = probe(url, requests[: args.probe])
            asyncio.run(load(url, requests, args.warmup, args.concurrency, args.warmup_seconds))
            load_before = load_average()
            if args.client == "wrk":
                figures = wrk_load(url, measured, args.concurrency, phase_limit, logs)
            else:
                figures = asyncio.run(load(url, measured, args.requests, args.concurrency, phase_limit))
            load_after = load_average()
        finally:
            stop_server(process)
        row = {
            "key": name,
            "int8": int8,
            "rerank_k": k,
            "FUSIONRANK_RERANK_K": config_env.get("FUSIONRANK_RERANK_K"),
            "served_rerank_k": served_k,
            "startup_seconds": round(startup, 1),
            "phase_limit_seconds": round(phase_limit, 1),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "probe": probed,
            **figures,
        }
        rows.append(row)
        _log(f"[{load_after}] {name}: {json.dumps({k2: row[k2] for k2 in row if k2 != 'probe'})}")
        _log(f"    probe: {json.dumps(probed)}")
    return {
        "bento": paths.bento,
        "bento_source": paths.bento_source,
        "bentoml_home": str(paths.bentoml_home),
        "feature_store": manifest.get("feature_store"),
        "feature_store_present": bool(manifest.get("feature_store"))
        and Path(manifest["feature_store"]).is_dir(),
        "bundle_serving_config": serving,
        "request_set": request_info,
        "concurrency": args.concurrency,
        "requests_per_phase": args.requests,
        "warmup_requests": args.warmup,
        "torch_threads": args.torch_threads or "1 per worker (server default)",
        "workers": args.workers,
        "model_process": os.environ.get("FUSIONRANK_MODEL_PROCESS", "on (default)"),
        "client": args.client,
        "context_cache": args.context_cache,
        "retrieve_k": retrieve_k,
        "sweep_seconds": round(time.monotonic() - sweep_started, 1),
        "server_logs": str(logs),
        "rows": rows,
    }


# -- report ---------------------------------------------------------------------------------------------


def choose_default(
    quality: Mapping[str, Any], latency: Mapping[str, Any], target_ms: float
) -> dict[str, Any]:
    """The config with the best NDCG@10 whose p99 is under the target (ties: the lower p99)."""
    if not latency.get("rows"):
        return {"chosen": None, "why": "no latency measured"}
    ndcg = {row["key"]: row["ndcg@10"] for row in quality["rows"]}
    meeting = [
        row
        for row in latency["rows"]
        if row["p99_ms"] is not None
        and row["p99_ms"] < target_ms
        and row["errors"] == 0
        and row["key"] in ndcg
    ]
    if not meeting:
        return {"chosen": None, "why": f"none meets p99 < {target_ms:g} ms"}
    best = max(meeting, key=lambda r: (ndcg[r["key"]], -r["p99_ms"]))
    return {
        "chosen": best["key"],
        "rerank_k_cpu": best["rerank_k"],
        "int8": best["int8"],
        "ndcg@10": ndcg[best["key"]],
        "p99_ms": best["p99_ms"],
        "why": f"best NDCG@10 among {len(meeting)} config(s) with p99 < {target_ms:g} ms",
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if np.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def markdown(result: Mapping[str, Any]) -> str:
    quality, latency = result["quality"], result.get("latency") or {}
    by_key = {row["key"]: row for row in latency.get("rows", [])}
    lines = [
        f"### {result['source']} ({result['mode']}): {result['run']}",
        "",
        f"Test split, {quality['evaluated_requests']} requests with a judged relevant product "
        f"({quality['left_out_without_positive_gain']} without one left out; "
        f"{quality['test_requests_without_candidates']} test requests had no candidates at all and are not "
        f"in the frames, {quality['of_which_with_relevant_judgments']} of them with a relevant judgment). "
        f"Row 1: {quality['rows'][0]['fusion']}. Row 2: {quality['rows'][1]['fusion']}. Rows 3-4, the run's "
        f"selected fusion: {quality['selected_summary']}. p-value: {quality['stat_test']} against the row "
        f"named in 'vs'. Quality computed at load average {quality['load_average']}.",
        "",
        "| config | key | NDCG@10 | p-value | vs | candidate recall (mean cands) | p50 ms | p99 ms | req/s | "
        "requests (errors) | load avg 1/5/15 |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in quality["rows"]:
        served = by_key.get(row["key"])
        candidates = row["candidates"]
        cells = [
            row["name"],
            row["key"],
            _fmt(row["ndcg@10"]),
            _p(row["p_value"]),
            row["compare_with"] or "-",
            f"{_fmt(candidates['recall'])} ({candidates['mean_candidates']:.1f})",
        ]
        if served:
            cells += [
                _fmt(served["p50_ms"], 1),
                _fmt(served["p99_ms"], 1),
                _fmt(served["throughput_rps"], 1),
                f"{served['ok']} ({served['errors']})",
                served["load_average_after"],
            ]
        else:
            cells += ["-", "-", "-", "-", quality["load_average"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if latency.get("rows"):
        all_k = by_key.get("fp32 k=all", {}).get("FUSIONRANK_RERANK_K")
        degraded = sum(row["probe"]["degraded"] for row in latency["rows"])
        probed = sum(row["probe"]["ok"] for row in latency["rows"])
        reasons = sorted({r for row in latency["rows"] for r in row["probe"]["reasons"]})
        if latency.get("bento_source", "").startswith("the package step did NOT"):
            lines.append(f"WARNING: Bento {latency['bento']} is {latency['bento_source']}.")
        lines.append(
            f"Latency: `bentoml serve` {latency['bento']} on 127.0.0.1, {latency['concurrency']} concurrent "
            f"clients, {latency['request_set']['requests']} test requests ({latency['request_set']['kind']}, "
            f"k=10) cycled, warm-up {latency['warmup_requests']} requests, up to "
            f"{latency['requests_per_phase']} measured requests per config within its time limit (see "
            f"'requests'), load generator {latency.get('client', 'python')}, "
            f"{latency.get('workers', 1)} worker(s), torch threads {latency['torch_threads']}, "
            f"FUSIONRANK_CONTEXT_CACHE="
            f"{latency.get('context_cache', '(unset)')}, FUSIONRANK_RETRIEVE_K="
            f"{latency['retrieve_k'] or '(unset)'}; 'all' served as FUSIONRANK_RERANK_K="
            f"{all_k or '(unset: the bundle says every candidate)'}; "
            f"sweep {latency['sweep_seconds']:.0f} s. Feature store "
            f"{latency['feature_store']} ({'present' if latency['feature_store_present'] else 'MISSING'}); "
            f"probe responses degraded: {degraded} of {probed}"
            + (f" ({'; '.join(reasons)})" if reasons else "")
            + "."
        )
    elif latency.get("skipped"):
        lines.append(f"Latency not measured: {latency['skipped']}.")
    recomputed = quality.get("recomputed") or {}
    if "int8_vs_frames" in recomputed:
        diffs = ", ".join(
            f"{c} max {d['max_abs_diff']:.4g} (mean {d['mean_abs_diff']:.3g}, "
            f"NaN mismatches {d['nan_mismatch']})"
            for c, d in recomputed["int8_vs_frames"].items()
        )
        lines.append(f"int8 recomputed vs the frames' fp32 scores: {diffs}.")
    if "fp32_recomputed_vs_frames" in recomputed:
        diffs = ", ".join(
            f"{c} max {d['max_abs_diff']:.3g}" for c, d in recomputed["fp32_recomputed_vs_frames"].items()
        )
        lines.append(
            f"Same path in fp32 on {recomputed['fp32_check_requests']} requests vs the frames: {diffs}."
        )
    if quality.get("single_signals"):
        cells = []
        for item in quality["single_signals"]:
            cell = f"{item['key']} {item['ndcg@10']:.4f}"
            if item["compare_with"]:
                cell += f" (p={_p(item['p_value'])} vs {item['compare_with']})"
            cells.append(cell)
        lines.append("Each encoder alone on the test candidates, NDCG@10: " + ", ".join(cells) + ".")
    for column in ("s_bert", "s_dense"):
        weight = quality.get(f"selected_weight_{column}")
        if weight is not None and weight == 0:
            lines.append(
                f"NOTE: the selected weighted fusion gives {column} weight 0"
                + (
                    ": the k rows differ only by the per-query min-max re-normalisation of the shortlist "
                    "(the re-ranked top k is scored by the fusion over its own rows), not by the "
                    "cross-encoder, and int8 cannot change rows 3-4 through it."
                    if column == "s_bert"
                    else ": int8's change of s_dense cannot move rows 3-4 either."
                )
            )
    missing = quality["of_which_with_relevant_judgments"]
    if missing:
        n = quality["evaluated_requests"]
        lines.append(
            f"{missing} test request(s) with a relevant judgment have no candidates in the frames and are "
            f"left out of every row (as in the pipeline's evaluate step); counted as 0 they would multiply "
            f"every NDCG@10 and recall above by {n}/{n + missing} = {n / (n + missing):.4f}."
        )
    change = {
        row["key"]: row["ndcg@10"]
        - next(r["ndcg@10"] for r in quality["rows"] if r["key"] == row["compare_with"])
        for row in quality["rows"]
        if row.get("int8")
    }
    if change:
        lines.append(
            "NDCG@10 change int8 - fp32: " + ", ".join(f"{k}: {v:+.4f}" for k, v in change.items()) + "."
        )
    if quality.get("pipeline_evaluate_ndcg@10_selected") is not None:
        lines.append(
            f"Check: the pipeline's evaluate step gave the selected fusion NDCG@10 "
            f"{quality['pipeline_evaluate_ndcg@10_selected']:.4f} (row 'fp32 k=all' here: "
            f"{next(r['ndcg@10'] for r in quality['rows'] if r['key'] == 'fp32 k=all'):.4f})."
        )
    lines += ["", "Candidate generators (recall@100, as the bi-encoder step measured them):", ""]
    generators = result["generator_recall"]
    if generators:
        lines += ["| generator | valid | test |", "|---|---:|---:|"]
        for name, values in generators.items():
            lines.append(f"| {name} | {_fmt(values.get('valid'))} | {_fmt(values.get('test'))} |")
    else:
        lines.append("(no recall figures in finetune-biencoder/executor_output.json)")
    chosen = result["default"]
    lines += [
        "",
        (
            f"Default rerank_k_cpu: {k_label(chosen['rerank_k_cpu'])} with int8 "
            f"{'on' if chosen['int8'] else 'off'} "
            f"(NDCG@10 {chosen['ndcg@10']:.4f}, p99 {chosen['p99_ms']} ms): {chosen['why']}."
            if chosen.get("chosen")
            else f"Default rerank_k_cpu: {chosen['why']}."
        ),
        f"Load average (1/5/15 min) at the end: {result['load_average_end']}.",
        "",
    ]
    return "\n".join(lines)


def benchmark_run(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    paths = RunPaths.of(run)
    mode = json.loads((paths.dense / "frames.json").read_text()).get("mode")
    _log(f"[{load_average()}] {paths.run}: quality rows ...")
    quality = evaluate_quality(paths, int8=args.int8, fp32_check_queries=args.fp32_check_requests)
    _log(f"[{load_average()}] quality done in {quality['seconds']} s")
    if args.latency and args.current_code:
        paths.rebuild_bento()
        _log(f"[{load_average()}] serving {paths.bento}: {paths.bento_source}")
    latency = latency_sweep(paths, args) if args.latency else {"skipped": "--no-latency"}
    return {
        "run": str(paths.run),
        "source": paths.source(),
        "mode": mode,
        "bundle": str(paths.bundle) if paths.bundle else None,
        "quality": quality,
        "generator_recall": generator_recall(paths),
        "candidates_step": {
            k: v for k, v in _task_metrics(paths.run / "candidates" / "executor_output.json").items()
        },
        "latency": latency,
        "default": choose_default(quality, latency, args.p99_target_ms),
        "load_average_end": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serving import add_server_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=True, help="int8 quality rows"
    )
    parser.add_argument("--requests", type=int, default=200, help="measured requests per latency config")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="time limit of each measured phase")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per config")
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="latency sweep budget per dataset")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--probe", type=int, default=3, help="requests whose answers are checked per config")
    parser.add_argument(
        "--retrieve-k",
        type=int,
        help="FUSIONRANK_RETRIEVE_K of the server (default: the run's BM25 depth for search, see "
        "evaluated_retrieve_k)",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--client",
        choices=["python", "wrk"],
        default="python",
        help="load generator (see bench_serving.py): wrk runs each measured phase for its time limit",
    )
    parser.add_argument(
        "--context-cache",
        type=int,
        default=32,
        help="FUSIONRANK_CONTEXT_CACHE of the server: the default, one batch's contexts, keeps no request's "
        "vector until its text comes round again (the requests cycle), so every request encodes its own",
    )
    parser.add_argument(
        "--current-code",
        action="store_true",
        help="serve each run's model in a Bento rebuilt with the current serving code",
    )
    parser.add_argument(
        "--only", action="append", help="serve only this config (repeatable), e.g. --only 'int8 k=0'"
    )
    parser.add_argument(
        "--history",
        choices=["request", "store"],
        default="request",
        help="recommendation requests send the test split's history (default), or only the user, so the "
        "server reads the user's history from the feature store",
    )
    parser.add_argument("--p99-target-ms", type=float, default=100.0)
    parser.add_argument("--fp32-check-requests", type=int, default=10, help="fp32 recompute check (0: off)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    _log(f"cpus {os.cpu_count()}, load average {load_average()}")
    results = []
    for run in args.run:
        result = benchmark_run(run, args)
        results.append(result)
        print(markdown(result), flush=True)
        if args.json:  # after each dataset, so a later failure keeps the earlier figures
            args.json.write_text(
                json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2, default=str)
            )
    return results


if __name__ == "__main__":
    # a background job ignores SIGINT: SIGTERM must still run the `finally` that stops a server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
