"""Does fine-tuning help? The cross-encoder against the pretrained embedding's cosine, on validation queries.

    .venv/bin/python benchmarks/bert_quality.py                  # a small Home Depot sample on this CPU

Home Depot judgments are split by query (`fusionrank.splits.split_search`); MiniLM-L6 is fine-tuned on a
sample of training queries and both models rank the judged products of every validation query. Reported:
NDCG@10 (linear gains relevance - 1) of random order, of the pretrained embedding's cosine (the model not
fine-tuned), and of the fine-tuned cross-encoder, with RMSE against predicting the training mean. The GPU
benchmark (`bench_bert_gpu.py`) calls `compare_quality` on the full splits of both datasets.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

app = typer.Typer(add_completion=False)

RANDOM_ORDER_SEEDS = 5


def compare_quality(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    base_model: str | Path,
    output_dir: str | Path,
    config: Any,
    device: str | None = None,
    distill: Any = None,
) -> dict[str, Any]:
    """Fine-tune on `train` and compare validation NDCG@10 with the pretrained cosine and random order.

    `config` is a `fusionrank.bert.FinetuneConfig`. Gains are validation labels above the lowest one. With
    `distill` (a `fusionrank.biencoder.BiEncoderConfig`), the fine-tuned cross-encoder then teaches a
    bi-encoder (its scores of the training pairs, margin-MSE, as the pipeline's bi-encoder step does), and
    the row adds the bi-encoder's NDCG@10 and the share of the cross-encoder's gain over the pretrained
    cosine that it recovers.
    """
    from fusionrank import bert

    started = time.perf_counter()
    metrics = bert.finetune_cross_encoder(train, valid, base_model, output_dir, config)
    finetune_seconds = time.perf_counter() - started
    contexts, texts = valid["context"].tolist(), valid["text"].tolist()
    cosine = bert.pretrained_similarity(base_model, contexts, texts, device=device, batch_size=512)
    labels = valid["label"].to_numpy(dtype=np.float64)
    gains, groups = labels - labels.min(), valid["group"]
    rng = np.random.default_rng(0)
    random_order = np.mean(
        [bert.ndcg_at_k(groups, gains, rng.random(len(valid))) for _ in range(RANDOM_ORDER_SEEDS)]
    )
    row: dict[str, Any] = {
        "loss": config.loss,
        "train_pairs": metrics["train_pairs"],
        "valid_pairs": len(valid),
        "valid_groups": int(valid["group"].nunique()),
        "ndcg_at_10_random": float(random_order),
        "ndcg_at_10_pretrained_cosine": bert.ndcg_at_k(groups, gains, cosine),
        "ndcg_at_10_finetuned": metrics[f"valid_ndcg_at_{bert.NDCG_K}"],
        "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epochs"],
        "finetune_seconds": finetune_seconds,
        "train_pairs_per_s": metrics["throughput"]["pairs_per_s"],
        "settings": metrics["settings"],
        "device": metrics["device"],
    }
    row["ndcg_at_10_gain_over_cosine"] = row["ndcg_at_10_finetuned"] - row["ndcg_at_10_pretrained_cosine"]
    if distill is not None:
        row |= distil_quality(train, valid, base_model, Path(output_dir), distill, device, row)
    if config.loss == "mse":
        row["rmse_finetuned"] = metrics["valid_rmse"]
        row["rmse_train_mean"] = math.sqrt(float(np.mean((labels - train["label"].mean()) ** 2)))
    return row


def distil_quality(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    base_model: str | Path,
    teacher_dir: Path,
    config: Any,
    device: str | None,
    row: dict[str, Any],
) -> dict[str, Any]:
    """The bi-encoder distilled from the cross-encoder in `teacher_dir`: validation NDCG@10 and recovery."""
    from fusionrank import bert, biencoder

    if config.max_train_groups:
        # score only the groups the bi-encoder will see: the teacher's pass costs as much as training
        train = _some_groups(train, config.max_train_groups, config.seed)
    started = time.perf_counter()
    teacher = bert.CrossEncoder.load(teacher_dir, device=device)
    taught = train.assign(teacher=teacher.score(train["context"].tolist(), train["text"].tolist(), 1024))
    scored = time.perf_counter() - started
    metrics = biencoder.finetune_bi_encoder(taught, valid, base_model, teacher_dir.with_name("bi"), config)
    gain = row["ndcg_at_10_gain_over_cosine"]
    distilled = metrics[f"valid_ndcg_at_{bert.NDCG_K}"]
    return {
        "ndcg_at_10_biencoder_distilled": distilled,
        "biencoder_recovery_of_cross_encoder_gain": (
            # a share of a gain means something only when the cross-encoder gained
            (distilled - row["ndcg_at_10_pretrained_cosine"]) / gain if gain > 0 else float("nan")
        ),
        "teacher_scoring_seconds": scored,
        "biencoder_seconds": metrics["seconds"],
        "biencoder_epochs": metrics["epochs"],
    }


@app.command()
def main(
    train_queries: Annotated[int, typer.Option(help="Training queries sampled (0: all).")] = 250,
    valid_queries: Annotated[int, typer.Option(help="Validation queries sampled (0: all).")] = 200,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (early stopping on NDCG@10).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    max_length: Annotated[int, typer.Option(help="Tokens per pair.")] = 48,
    threads: Annotated[int, typer.Option(help="torch threads (1 is fastest on a busy shared CPU).")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write the figures here as JSON.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, the samples and training.")] = 0,
) -> None:
    """Run the comparison on a Home Depot sample on this machine (CPU unless CUDA is present)."""
    import torch

    from fusionrank import bert
    from fusionrank.data.sources import load_source
    from fusionrank.splits import split_search

    torch.set_num_threads(threads)
    tables = load_source("homedepot")
    parts = split_search(tables.judgments, valid_frac=0.1, test_frac=0.1, seed=seed)
    train = _some_groups(bert.search_pairs(parts["train"], tables.products), train_queries, seed)
    valid = _some_groups(bert.search_pairs(parts["valid"], tables.products), valid_queries, seed)
    config = bert.FinetuneConfig(
        max_length=max_length, batch_size=batch_size, learning_rate=learning_rate, epochs=epochs, seed=seed
    )
    with tempfile.TemporaryDirectory() as work:
        row = compare_quality(train, valid, bert.default_base_model(), work, config)
    row["threads"] = threads
    shown = {k: v for k, v in row.items() if k not in ("epochs", "settings")}
    typer.echo(json.dumps(shown, indent=2))
    typer.echo(json.dumps(row["epochs"], indent=2))
    if out is not None:
        out.write_text(json.dumps(row, indent=2))


def _some_groups(pairs: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    groups = np.sort(pairs["group"].unique().astype(str))
    if limit and len(groups) > limit:
        groups = np.random.default_rng(seed).choice(groups, size=limit, replace=False)
    return pairs[pairs["group"].isin(set(groups))].reset_index(drop=True)


if __name__ == "__main__":
    app()
