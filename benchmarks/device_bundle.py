"""Prepare `.device/`: what the GPU benchmark needs on a machine that has no data, no network and no package.

    .venv/bin/python benchmarks/device_bundle.py     # writes .device/ (git-ignored), prints the command

The folder holds MiniLM-L6 saved in bf16 with its tokenizer, and one parquet of real pairs:
- Home Depot (search): (query, product title, graded relevance 1-3), split by query with
  `fusionrank.splits.split_search` (10% validation; the 10% test queries are left out entirely);
- Amazon Games (recommendation): per user, the titles of earlier purchases (newest first) as context, the
  next purchase as positive and uniformly drawn catalog products as negatives. Split leave-last-out with
  `split_recommendation`: training groups end at each user's last training purchase, validation groups at
  the validation purchase (19 negatives, as in the published 20-candidate protocol); the test purchase is
  never included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

app = typer.Typer(add_completion=False)

REPO = Path(__file__).resolve().parents[1]
PAIRS_FILE = "pairs.parquet"
MODEL_DIR = "minilm"
MANIFEST = "bundle.json"
# The run tool carries at most 64 MiB of ignored paths; MiniLM in bf16 takes ~43 MiB of it.
CARRY_LIMIT_BYTES = 64 * 2**20


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder to (re)write.")] = REPO / ".device",
    data_dir: Annotated[Path | None, typer.Option(help="Real data folder (default: ../shared/data).")] = None,
    games_train_users: Annotated[int, typer.Option(help="Users with a training group (0: all).")] = 30_000,
    games_valid_users: Annotated[int, typer.Option(help="Users with a validation group.")] = 2_000,
    max_titles: Annotated[int, typer.Option(help="History titles in a Games context.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the splits, user samples and negatives.")] = 0,
) -> None:
    """Write the bundle and print the one command that runs the benchmark on the GPU machine."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fusionrank.bert import default_base_model, recommendation_pairs, search_pairs
    from fusionrank.data.sources import load_source
    from fusionrank.splits import split_recommendation, split_search

    if out.exists():
        shutil.rmtree(out)
    (out / MODEL_DIR).mkdir(parents=True)
    base = default_base_model()
    AutoModel.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(out / MODEL_DIR)
    AutoTokenizer.from_pretrained(base).save_pretrained(out / MODEL_DIR)

    home_depot = load_source("homedepot", data_dir)
    parts = split_search(home_depot.judgments, valid_frac=0.1, test_frac=0.1, seed=seed)
    frames = [
        search_pairs(parts[name], home_depot.products).assign(dataset="homedepot", split=name)
        for name in ("train", "valid")
    ]

    games = load_source("amazon-games", data_dir)
    splits = split_recommendation(games.interactions)
    train_users = _some_users(splits["train"]["user_id"], games_train_users, seed)
    valid_users = _some_users(splits["valid"]["user_id"], games_valid_users, seed + 1)
    train_events = splits["train"][splits["train"]["user_id"].isin(train_users)]
    frames.append(
        recommendation_pairs(
            train_events, games.products, n_negatives=7, max_titles=max_titles, seed=seed
        ).assign(dataset="games", split="train")
    )
    known = pd.concat([splits["train"], splits["valid"]], ignore_index=True)
    valid_events = known[known["user_id"].isin(valid_users)]
    frames.append(
        recommendation_pairs(
            valid_events, games.products, n_negatives=19, max_titles=max_titles, seed=seed + 1
        ).assign(dataset="games", split="valid")
    )
    pairs = pd.concat(frames, ignore_index=True)[["dataset", "split", "group", "context", "text", "label"]]
    pairs.to_parquet(out / PAIRS_FILE, index=False, compression="zstd", row_group_size=50_000)

    counts = pairs.groupby(["dataset", "split"]).agg(pairs=("label", "size"), groups=("group", "nunique"))
    manifest = {
        "pairs": {f"{d}/{s}": {k: int(v) for k, v in row.items()} for (d, s), row in counts.iterrows()},
        "homedepot": {"split": "split_search(valid_frac=0.1, test_frac=0.1)", "seed": seed},
        "games": {
            "split": "split_recommendation (leave-last-out); test purchases excluded",
            "train_users": len(train_users),
            "valid_users": len(valid_users),
            "negatives": {"train": 7, "valid": 19, "kind": "uniform over the catalog"},
            "max_titles": max_titles,
            "seed": seed,
        },
        "base_model": str(base),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(counts.to_string())
    typer.echo(f"\n{out}: {size / 2**20:.1f} MiB (carry limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB)")
    if size > CARRY_LIMIT_BYTES:
        raise typer.Exit(f"{out} is too large to carry; lower --games-train-users")
    relative = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    typer.echo(f"\nOn the GPU machine (repository root; the folder travels with carry=['{relative}']):")
    command = (
        f'PYTHONPATH=src python benchmarks/bench_bert_gpu.py --bundle {relative} --out "$OUT/bench_bert.json"'
    )
    typer.echo(f"  {command}")


def _some_users(users: pd.Series, limit: int, seed: int) -> set[str]:
    """`limit` distinct users drawn with a seed from the sorted ids; all of them when `limit` is 0."""
    ids = pd.Series(sorted(users.astype(str).unique()))
    if limit and len(ids) > limit:
        ids = ids.sample(n=limit, random_state=seed)
    return set(ids)


if __name__ == "__main__":
    app()
