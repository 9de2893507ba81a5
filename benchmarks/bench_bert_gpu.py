"""GPU benchmark of the cross-encoder: our training loop against Hugging Face's Trainer, scoring, and quality.

From the repository root of a GPU machine (the package need not be installed):

    PYTHONPATH=src python benchmarks/bench_bert_gpu.py --bundle .device --out bench_bert.json

`benchmarks/device_bundle.py` writes the bundle (MiniLM-L6 in bf16 and real pairs). One run measures, on the
same real pairs, with the same model and the same batch size:
- training: `finetune_cross_encoder` (eager and with torch.compile) and `transformers.Trainer` with its
  default settings plus `bf16=True` (its progress bar and checkpoint saving are switched off, which can only
  make it faster; see TRAINER_CHANGES). Pairs/s, non-padding tokens/s, and MFU counted on
  non-padding tokens (6 x non-embedding parameters per token plus attention, `fusionrank.bert.model_flops`)
  against a bf16 matmul peak measured in the same run. Steady state: the first 20 optimizer steps (compile,
  allocator warm-up) are left out of both.
- scoring: `CrossEncoder` in bf16, model only (pairs tokenized beforehand) and end to end.
- quality: validation NDCG@10 of the fine-tuned model against the pretrained embedding's cosine, and of a
  bi-encoder distilled from it (`--distill`, the pipeline's margin-MSE recipe), with the share of the
  cross-encoder's gain it recovers.
Tables go to the terminal; every figure goes to --out as JSON, rewritten after each measurement, so a run
cut short keeps what it measured. A measurement that fails is recorded with its error and the run goes on.
Needs torch, transformers, accelerate (Trainer), numpy, pandas, pyarrow, typer and rich; `--device cpu`
runs it (slowly) without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False)
console = Console(width=150)  # wide tables stay whole in a captured log

# Offline and quiet on a machine that reaches nothing; set before transformers is imported.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "true",
}


# The Trainer's only settings besides batch size, step count and output folder that differ from its defaults.
TRAINER_CHANGES = {"bf16": True, "save_strategy": "no", "disable_tqdm": True}


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset of the bundle is trained: tokens per pair, and the loss of the quality run."""

    max_length: int
    quality_loss: str


DATASETS = {
    "homedepot": DatasetSpec(max_length=64, quality_loss="mse"),
    "games": DatasetSpec(max_length=128, quality_loss="listwise"),
}


@app.command()
def main(
    bundle: Annotated[Path, typer.Option(help="Folder written by benchmarks/device_bundle.py.")],
    out: Annotated[Path, typer.Option(help="JSON file for every figure.")] = Path("bench_bert.json"),
    device: Annotated[str, typer.Option(help="cuda, or cpu for a slow dry run.")] = "cuda",
    datasets: Annotated[str, typer.Option(help="Comma-separated: homedepot, games.")] = "homedepot,games",
    batch_sizes: Annotated[
        str, typer.Option(help="Training batch sizes (pairs), comma-separated.")
    ] = "256,1024",
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per training run (after warm-up).")] = 80,
    compile: Annotated[
        bool, typer.Option(help="Also measure our loop and scoring with torch.compile.")
    ] = True,
    eager: Annotated[bool, typer.Option(help="Also measure our loop without torch.compile.")] = True,
    trainer: Annotated[bool, typer.Option(help="Measure the Hugging Face Trainer.")] = True,
    throughput: Annotated[bool, typer.Option(help="Run the training throughput section.")] = True,
    scoring: Annotated[bool, typer.Option(help="Run the scoring section.")] = True,
    score_pairs: Annotated[int, typer.Option(help="Pairs scored per scoring measurement.")] = 200_000,
    score_batch_size: Annotated[int, typer.Option(help="Pairs per scoring batch.")] = 1024,
    quality: Annotated[bool, typer.Option(help="Run the quality section (full train split).")] = True,
    quality_epochs: Annotated[int, typer.Option(help="Epochs of the quality runs.")] = 2,
    quality_batch_size: Annotated[int, typer.Option(help="Pairs (mse) per step of the quality runs.")] = 32,
    quality_groups: Annotated[int, typer.Option(help="Groups (listwise) per step of the quality runs.")] = 16,
    quality_learning_rate: Annotated[
        float, typer.Option(help="Peak learning rate of the quality runs.")
    ] = 1e-4,
    quality_max_train: Annotated[int, typer.Option(help="Cap on training pairs/groups (0: all).")] = 0,
    quality_max_valid: Annotated[int, typer.Option(help="Cap on validation groups (0: all).")] = 0,
    distill: Annotated[
        bool, typer.Option(help="In the quality section, also distil a bi-encoder from each cross-encoder.")
    ] = True,
) -> None:
    """Measure, print the tables, write the JSON."""
    sys.stdout.reconfigure(line_buffering=True)  # a run killed at its time limit still shows its progress
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    import transformers

    from fusionrank import bert

    names = [n.strip() for n in datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise typer.BadParameter(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
    sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    model_dir = bundle / "minilm"
    pairs = pd.read_parquet(bundle / "pairs.parquet")
    results: dict[str, Any] = {
        "command": "bench_bert_gpu.py",
        "device": _device_name(device),
        "host": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": {
            "datasets": names,
            "batch_sizes": sizes,
            "timed_steps": steps,
            "warmup_steps": bert.THROUGHPUT_WARMUP_STEPS,
            "max_length": {n: DATASETS[n].max_length for n in names},
            "score_pairs": score_pairs,
            "score_batch_size": score_batch_size,
            "trainer_changes": TRAINER_CHANGES,
        },
        "training": [],
        "scoring": [],
        "quality": [],
        "errors": [],
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))

    started = time.perf_counter()
    results["peak"] = matmul_peak(device)
    peak = results["peak"]["tflops"] * 1e12
    console.print(
        f"{results['device']}: measured {results['peak']['dtype']} matmul peak {peak / 1e12:.3g} TFLOP/s"
    )
    save()

    checkpoints: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if throughput:
            for name in names:
                train = pairs[(pairs["dataset"] == name) & (pairs["split"] == "train")].reset_index(drop=True)
                for size in sizes:
                    needed = (steps + bert.THROUGHPUT_WARMUP_STEPS) * size
                    frame = train.sample(n=min(len(train), needed), random_state=0).reset_index(drop=True)
                    common = {
                        "frame": frame,
                        "model_dir": model_dir,
                        "spec": DATASETS[name],
                        "batch_size": size,
                    }
                    common |= {"steps": steps, "device": device, "peak": peak}
                    loops = [("ours eager", False)] if eager else []
                    loops += [("ours compiled", True)] if compile else []
                    for loop, compiled in loops:
                        checkpoint = work / f"{name}-{size}-{'compiled' if compiled else 'eager'}"
                        measure = partial(train_ours, compiled=compiled, checkpoint=checkpoint, **common)
                        if _record(results, "training", f"{name} {loop} batch {size}", measure, loop=loop):
                            checkpoints[name] = checkpoint
                        save()
                    if trainer:
                        measure = partial(train_trainer, work=work, **common)
                        _record(
                            results, "training", f"{name} HF Trainer batch {size}", measure, loop="HF Trainer"
                        )
                        save()
            _add_speedups(results["training"])
            save()
            _print_training(results["training"])

        if scoring:
            for name in names:
                subset = pairs[pairs["dataset"] == name].reset_index(drop=True)
                for compiled in [False, True] if compile else [False]:
                    measure = partial(
                        score_throughput,
                        subset,
                        checkpoints.get(name),
                        model_dir,
                        DATASETS[name],
                        score_pairs,
                        score_batch_size,
                        device,
                        compiled,
                        peak,
                        work / f"{name}-score",
                    )
                    label = f"{name} {'compiled' if compiled else 'eager'}"
                    _record(results, "scoring", label, measure, compiled=compiled)
                    save()
            _print_scoring(results["scoring"])

        if quality:
            from bert_quality import compare_quality

            for name in names:
                spec = DATASETS[name]
                train = pairs[(pairs["dataset"] == name) & (pairs["split"] == "train")].reset_index(drop=True)
                valid = pairs[(pairs["dataset"] == name) & (pairs["split"] == "valid")].reset_index(drop=True)
                if quality_max_valid:
                    kept = (
                        valid["group"]
                        .drop_duplicates()
                        .sample(frac=1.0, random_state=0)
                        .head(quality_max_valid)
                    )
                    valid = valid[valid["group"].isin(set(kept))].reset_index(drop=True)
                config = bert.FinetuneConfig(
                    max_length=spec.max_length,
                    batch_size=quality_batch_size if spec.quality_loss == "mse" else quality_groups,
                    learning_rate=quality_learning_rate,
                    epochs=quality_epochs,
                    loss=spec.quality_loss,
                    max_train_samples=quality_max_train or None,
                    compile=compile,
                    device=device,
                )
                distill_config = None
                if distill:
                    from fusionrank.biencoder import BiEncoderConfig

                    distill_config = BiEncoderConfig(
                        max_length=spec.max_length,
                        batch_size=64,
                        learning_rate=5e-5,
                        epochs=1,
                        max_train_groups=quality_max_train or None,
                        device=device,
                    )
                measure = partial(
                    compare_quality,
                    train,
                    valid,
                    model_dir,
                    work / f"{name}-quality",
                    config,
                    device,
                    distill_config,
                )
                _record(results, "quality", name, measure)
                save()
            _print_quality(results["quality"])

    results["seconds"] = time.perf_counter() - started
    save()
    console.print(f"{len(results['errors'])} error(s); figures in {out} ({results['seconds']:.0f} s)")


# ---------------------------------------------------------------------------------------------------------
# Measurements


def matmul_peak(device: str) -> dict[str, Any]:
    """The best dense matmul rate over a few square sizes: bf16 on CUDA, fp32 (what trains there) on a CPU."""
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    best = 0.0
    for n in (4096, 8192, 16384) if cuda else (1024,):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        repeats = 50 if cuda else 5
        for _ in range(3):
            torch.mm(a, b, out=c)
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=c)
        _sync(device)
        best = max(best, 2.0 * n**3 * repeats / (time.perf_counter() - started))
        del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return {"dtype": str(dtype).replace("torch.", ""), "tflops": best / 1e12}


def train_ours(
    frame: pd.DataFrame,
    model_dir: Path,
    spec: DatasetSpec,
    batch_size: int,
    steps: int,
    compiled: bool,
    device: str,
    checkpoint: Path,
    peak: float,
) -> dict[str, Any]:
    """Steady-state throughput of `finetune_cross_encoder` (mse on the pairs' labels)."""
    import torch

    from fusionrank import bert

    if compiled:
        torch.compiler.reset()  # each measurement compiles from a clean slate (the on-disk cache may help)
    config = bert.FinetuneConfig(
        max_length=spec.max_length,
        batch_size=batch_size,
        epochs=1_000_000,  # max_steps ends the run; small datasets go round several times
        max_steps=steps + bert.THROUGHPUT_WARMUP_STEPS,
        compile=compiled,
        device=device,
    )
    started = time.perf_counter()
    metrics = bert.finetune_cross_encoder(frame, None, model_dir, checkpoint, config)
    timed = metrics["throughput"]
    return {
        "batch_size": batch_size,
        "max_length": spec.max_length,
        "timed_steps": timed["steps"],
        "pairs_per_s": timed["pairs_per_s"],
        "tokens_per_s": timed["tokens_per_s"],
        "tflops": timed["flops_per_s"] / 1e12,
        "mfu": timed["flops_per_s"] / peak,
        "padding_fraction": timed["padding_fraction"],
        "final_train_loss": metrics["loss_curve"][-1],
        "wall_seconds": time.perf_counter() - started,
    }


class _TokenizedPairs:
    """Pairs as the Trainer's default pipeline expects them (lists of ids; its collator pads each batch).

    `fetched` records the length of every pair the data loader asks for, so that the measured window's
    non-padding tokens are counted exactly rather than estimated.
    """

    def __init__(
        self, input_ids: list[list[int]], token_type_ids: list[list[int]], labels: np.ndarray
    ) -> None:
        self.input_ids, self.token_type_ids, self.labels = input_ids, token_type_ids, labels
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.input_ids[i]
        self.fetched.append(len(ids))
        return {
            "input_ids": ids,
            "token_type_ids": self.token_type_ids[i],
            "attention_mask": [1] * len(ids),
            "labels": float(self.labels[i]),
        }


def train_trainer(
    frame: pd.DataFrame,
    model_dir: Path,
    spec: DatasetSpec,
    batch_size: int,
    steps: int,
    device: str,
    work: Path,
    peak: float,
) -> dict[str, Any]:
    """Steady-state throughput of `transformers.Trainer` with default settings plus bf16, same pairs."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from fusionrank import bert

    total = bert.THROUGHPUT_WARMUP_STEPS + steps
    warmup = bert.throughput_warmup_steps(total)  # as our loop leaves out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(
        frame["context"].tolist(), frame["text"].tolist(), truncation=True, max_length=spec.max_length
    )
    dataset = _TokenizedPairs(encoded["input_ids"], encoded["token_type_ids"], frame["label"].to_numpy())
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    marks: dict[int, tuple[float, int]] = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, total):
                _sync(device)
                marks[state.global_step] = (time.perf_counter(), len(dataset.fetched))

    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=batch_size,
        max_steps=total,
        use_cpu=device == "cpu",
        report_to="none",  # the default in transformers 5, stated for older versions
        **(TRAINER_CHANGES | {"bf16": device.startswith("cuda")}),
    )
    started = time.perf_counter()
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    output = trainer.train()
    (t0, f0), (t1, f1) = marks[warmup], marks[total]
    # The loader runs ahead of the steps by the same few batches at both marks: the window holds the pairs
    # of `steps` batches.
    lengths = np.asarray(dataset.fetched[f0:f1], dtype=np.float64)
    seconds = t1 - t0
    flops = bert.model_flops(model, lengths, training=True)
    return {
        "batch_size": batch_size,
        "max_length": spec.max_length,
        "timed_steps": total - warmup,
        "pairs_per_s": len(lengths) / seconds,
        "tokens_per_s": lengths.sum() / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak,
        "padding_fraction": None,
        "final_train_loss": float(output.training_loss),
        "wall_seconds": time.perf_counter() - started,
    }


def score_throughput(
    pairs: pd.DataFrame,
    checkpoint: Path | None,
    model_dir: Path,
    spec: DatasetSpec,
    n_pairs: int,
    batch_size: int,
    device: str,
    compiled: bool,
    peak: float,
    scratch: Path,
) -> dict[str, Any]:
    """Pairs/s of `CrossEncoder` scoring: tokenizing, the model alone, and both (what a caller sees).

    Without a checkpoint from the training section, one is made with a single step (weights do not change
    the speed).
    """
    import torch

    from fusionrank import bert

    if checkpoint is None:
        checkpoint = scratch
        config = bert.FinetuneConfig(
            max_length=spec.max_length, max_steps=1, max_train_samples=64, device=device
        )
        bert.finetune_cross_encoder(pairs, None, model_dir, checkpoint, config)
    if compiled:
        torch.compiler.reset()
    encoder = bert.CrossEncoder.load(checkpoint, device=device, compile=compiled)
    repeats = math.ceil(n_pairs / len(pairs))
    contexts = (pairs["context"].tolist() * repeats)[:n_pairs]
    texts = (pairs["text"].tolist() * repeats)[:n_pairs]
    warm = min(n_pairs, 20 * batch_size)
    encoder.score(contexts[:warm], texts[:warm], batch_size)  # compile, allocator, kernel selection
    started = time.perf_counter()
    encoded = encoder.encode(contexts, texts)
    tokenize_seconds = time.perf_counter() - started
    _sync(device)
    started = time.perf_counter()
    encoder.score_encoded(encoded, batch_size)  # returns host numbers: the device has finished
    model_seconds = time.perf_counter() - started
    started = time.perf_counter()
    encoder.score(contexts, texts, batch_size)
    end_to_end_seconds = time.perf_counter() - started
    flops = bert.model_flops(encoder.model, encoded.lengths, training=False)
    return {
        "pairs": n_pairs,
        "batch_size": batch_size,
        "dtype": str(encoder.model.dtype).replace("torch.", ""),
        "mean_tokens": float(encoded.lengths.mean()),
        "tokenize_pairs_per_s": n_pairs / tokenize_seconds,
        "model_pairs_per_s": n_pairs / model_seconds,
        "end_to_end_pairs_per_s": n_pairs / end_to_end_seconds,
        "model_mfu": flops / model_seconds / peak,
    }


# ---------------------------------------------------------------------------------------------------------
# Reporting


def _record(
    results: dict[str, Any], section: str, label: str, measure: Callable[[], dict], **tags: Any
) -> bool:
    """Run one measurement and append its row (with `tags` and the dataset) to `results[section]`.

    A failure (no compiler, out of memory, ...) is recorded under "errors" and the run goes on.
    """
    console.print(f"[bold]{section}: {label}[/bold] ...")
    started = time.perf_counter()
    try:
        row = measure()
    except Exception as exc:  # one failed measurement must not lose the others
        results["errors"].append(
            {"what": f"{section}: {label}", "error": repr(exc), "traceback": traceback.format_exc()}
        )
        console.print(f"[red]{section}: {label} failed: {exc!r}[/red]")
        return False
    dataset = label.split()[0]
    results[section].append({"dataset": dataset, **tags, **row, "seconds": time.perf_counter() - started})
    console.print(f"  done in {time.perf_counter() - started:.0f} s")
    return True


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each of our rows gets its pairs/s over the Trainer's at the same dataset and batch size."""
    baseline = {(r["dataset"], r["batch_size"]): r["pairs_per_s"] for r in rows if r["loop"] == "HF Trainer"}
    for row in rows:
        reference = baseline.get((row["dataset"], row["batch_size"]))
        row["speedup_vs_trainer"] = row["pairs_per_s"] / reference if reference else None


def _print_training(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Training throughput (steady state, non-padding tokens)")
    for column in (
        "dataset",
        "loop",
        "batch",
        "pairs/s",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "padding",
        "x Trainer",
    ):
        table.add_column(column, justify="left" if column in ("dataset", "loop") else "right")
    for r in rows:
        table.add_row(
            r["dataset"],
            r["loop"],
            str(r["batch_size"]),
            f"{r['pairs_per_s']:,.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tflops']:.1f}",
            f"{100 * r['mfu']:.1f}%",
            "-" if r["padding_fraction"] is None else f"{100 * r['padding_fraction']:.1f}%",
            "-" if r.get("speedup_vs_trainer") is None else f"{r['speedup_vs_trainer']:.2f}",
        )
    console.print(table)


def _print_scoring(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Scoring throughput (pairs/s)")
    for column in ("dataset", "compiled", "batch", "mean tokens", "tokenize", "model", "end to end", "MFU"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in rows:
        table.add_row(
            r["dataset"],
            str(r["compiled"]),
            str(r["batch_size"]),
            f"{r['mean_tokens']:.1f}",
            f"{r['tokenize_pairs_per_s']:,.0f}",
            f"{r['model_pairs_per_s']:,.0f}",
            f"{r['end_to_end_pairs_per_s']:,.0f}",
            f"{100 * r['model_mfu']:.1f}%",
        )
    console.print(table)


def _print_quality(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Validation NDCG@10: fine-tuned vs not fine-tuned")
    columns = ("dataset", "loss", "groups", "random", "pretrained cosine", "fine-tuned", "gain", "RMSE")
    for column in (*columns, "bi-encoder", "recovered"):
        table.add_column(column, justify="left" if column in ("dataset", "loss") else "right")
    for r in rows:
        rmse = (
            f"{r['rmse_finetuned']:.3f} (mean {r['rmse_train_mean']:.3f})" if "rmse_finetuned" in r else "-"
        )
        table.add_row(
            r["dataset"],
            r["loss"],
            str(r["valid_groups"]),
            f"{r['ndcg_at_10_random']:.4f}",
            f"{r['ndcg_at_10_pretrained_cosine']:.4f}",
            f"{r['ndcg_at_10_finetuned']:.4f}",
            f"{r['ndcg_at_10_gain_over_cosine']:+.4f}",
            rmse,
            f"{r['ndcg_at_10_biencoder_distilled']:.4f}" if "ndcg_at_10_biencoder_distilled" in r else "-",
            _share(r.get("biencoder_recovery_of_cross_encoder_gain")),
        )
    console.print(table)


def _share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None and math.isfinite(value) else "-"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    app()
