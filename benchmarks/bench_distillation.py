"""The distillation figure of issue #11 for other bi-encoder settings, on a finished run's cross-encoder.

    .venv/bin/python benchmarks/bench_distillation.py --run RUN_DIR --out OUT_DIR \
        [-p bi_distill_weight=5] [-p bi_teacher_scale=10] [-p bi_group_size=16] \
        [-p bi_negatives=30 -p bi_distill_loss=listwise] [-p bi_max_train_samples=0] [-p bi_epochs=2] ...

RUN_DIR is a kfp.local run folder of the training pipeline that got as far as the cross-encoder
(`fusionrank run --local --home H` writes H/runs/fusionrank-training-<timestamp>). Its bi-encoder step
(`fusionrank.steps.biencoder_step`) runs again with the run's own arguments (RUN_DIR/pipeline-arguments.json
over the pipeline's defaults) overridden by the `-p` ones (bi_* parameters, `hybrid_k`, `embed_max_products`,
`seed`), on the run's data, splits, signals, cross-encoder and its scored frames, so the teacher and the
candidates are the run's and only the student changes. The run folder is read, never written: the feature
store the step writes embeddings into is a copy under OUT_DIR.

Printed and written to OUT_DIR/summary.json: the settings, the step's figures (training queries, validation
NDCG@10, recall@100 of each candidate generator on valid and test) and the distillation table that the
evaluate step puts in a run's evaluation (`champion.distillation_summary`: BM25, teacher and student on the
test requests, alone and each fused with BM25 by a weighted fusion fitted on the validation split).
A sweep costs one bi-encoder training per setting: 14 minutes for 2,500 Home Depot queries on a 2-core CPU,
about 42 for all 9,403.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusionrank.errors import ConfigError  # noqa: E402
from fusionrank.orchestration import ARGUMENTS_FILE, parse_params  # noqa: E402

# the pipeline parameters the bi-encoder step reads; the others belong to steps this one reuses
STEP_PARAMS = (
    "base_model",
    "tiny_model",
    "bi_epochs",
    "bi_batch_size",
    "bi_max_length",
    "bi_learning_rate",
    "bi_max_train_samples",
    "bi_distill_weight",
    "bi_teacher_scale",
    "bi_group_size",
    "bi_negatives",
    "bi_hard_pool",
    "bi_distill_loss",
    "embed_max_products",
    "hybrid_k",
    "int8_serving",
    "seed",
)
RUN_INPUTS = ("ingest/dataset", "split/splits", "features/feature_store", "candidates/signals")
TEACHER_INPUTS = ("finetune-bert/bert", "finetune-bert/scored_frames")


def step_arguments(run_dir: Path, overrides: dict[str, object]) -> dict[str, Any]:
    """The bi-encoder step's parameters: the pipeline's defaults, the run's arguments, then `overrides`."""
    from pipelines.training import training_pipeline

    unknown = sorted(set(overrides) - set(STEP_PARAMS))
    if unknown:
        raise ConfigError(f"not a parameter of the bi-encoder step: {', '.join(unknown)}")
    inputs = training_pipeline.component_spec.inputs or {}
    arguments = {name: inputs[name].default for name in STEP_PARAMS}
    recorded = run_dir / ARGUMENTS_FILE
    if recorded.is_file():
        given = json.loads(recorded.read_text())
        arguments.update({k: v for k, v in given.items() if k in arguments})
    arguments.update(overrides)
    arguments["user_vectors_max"] = 0  # served users' vectors: no part of the figure
    return arguments


def copy_feature_store(source: Path, target: Path) -> Path:
    """A copy of a run's feature store folder whose registry and online store point into the copy."""
    info = json.loads((source / "feature_store.json").read_text())
    old = str(Path(info["repo_path"]).parent)
    if target.exists():
        raise ConfigError(f"{target}: exists; give an empty --out")
    shutil.copytree(source, target)
    for name in ("feature_store.json", str(Path(info["yaml_path"]).relative_to(old))):
        path = target / name
        path.write_text(path.read_text().replace(old, str(target)))
    return target


def run(run_dir: Path, out_dir: Path, overrides: dict[str, object]) -> dict[str, Any]:
    from fusionrank.champion import distillation_markdown, frames_distillation
    from fusionrank.steps import biencoder_config, biencoder_step

    missing = [p for p in RUN_INPUTS + TEACHER_INPUTS if not (run_dir / p).exists()]
    if missing:
        raise ConfigError(f"{run_dir}: no run that trained the cross-encoder (missing {', '.join(missing)})")
    mode = json.loads((run_dir / "finetune-bert" / "scored_frames" / "frames.json").read_text())["mode"]
    if mode != "search":
        raise ConfigError(f"{run_dir}: a {mode} run; the distillation figure needs BM25 (a search run)")
    arguments = step_arguments(run_dir, overrides)
    settings = [
        arguments[name]
        for name in ("bi_epochs", "bi_batch_size", "bi_max_length", "bi_learning_rate", "seed")
    ]
    extra = {
        name: arguments[f"bi_{name}"]
        for name in (
            "distill_weight",
            "teacher_scale",
            "group_size",
            "negatives",
            "hard_pool",
            "distill_loss",
        )
    }
    biencoder_config(*settings, **extra)  # the step's own check, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    store = copy_feature_store(run_dir / "features" / "feature_store", out_dir / "feature_store")
    started = time.perf_counter()
    figures = biencoder_step(
        str(run_dir / "ingest" / "dataset"),
        str(run_dir / "split" / "splits"),
        str(store),
        str(run_dir / "candidates" / "signals"),
        str(run_dir / "finetune-bert" / "bert"),
        str(run_dir / "finetune-bert" / "scored_frames"),
        arguments["base_model"],
        arguments["tiny_model"],
        arguments["bi_epochs"],
        arguments["bi_batch_size"],
        arguments["bi_max_length"],
        arguments["bi_learning_rate"],
        arguments["bi_max_train_samples"],
        arguments["embed_max_products"],
        arguments["hybrid_k"],
        arguments["int8_serving"],
        arguments["seed"],
        str(out_dir / "signals"),
        str(out_dir / "dense_frames"),
        arguments["user_vectors_max"],
        **extra,
    )
    seconds = time.perf_counter() - started
    summary = frames_distillation(out_dir / "dense_frames")
    result = {
        "run": str(run_dir),
        "arguments": arguments,
        "step_seconds": seconds,
        "figures": figures,
        "distillation": summary,
        "markdown": distillation_markdown(summary),
    }
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a kfp.local run folder of the pipeline")
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for this setting")
    parser.add_argument("-p", "--param", action="append", default=[], help="key=value: a step parameter")
    args = parser.parse_args(argv)
    try:
        result = run(args.run.resolve(), args.out.resolve(), parse_params(args.param))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in result["arguments"].items() if k.startswith("bi_")}
    print(json.dumps({"settings": shown, "step_seconds": round(result["step_seconds"], 1)}, indent=1))
    print(json.dumps({k: round(v, 4) for k, v in result["figures"].items()}, indent=1))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
