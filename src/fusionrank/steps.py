"""One function per pipeline step, over folders: what each KFP component calls, and what tests call directly.

Each step reads its input folders, calls the library, and writes its output folders; it returns the small
figures and decisions the pipeline passes on as parameters or metrics. Folder layouts:
    dataset:  canonical tables (`Tables.write`) + manifest.json
    splits:   train/valid/test.parquet (judgments or interactions) + split.json
    frames:   {valid,test}.parquet candidate frames, {valid,test}_contexts.parquet (one row per request),
              {valid,test}_qrels.parquet (every judged product, retrieved or not), frames.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrank.context import Context, RankingExample
from fusionrank.data.contract import Tables
from fusionrank.errors import ConfigError, ValidationFailed
from fusionrank.ranker import (
    contexts_frame,
    examples_from_frames,
    qrels_frame,
    signal_frame,
    write_bundle,
)
from fusionrank.signals.base import FallbackRetriever
from fusionrank.signals.sequential import SASRecConfig

SPLIT_NAMES = ("train", "valid", "test")
STORE_INFO = "feature_store.json"
EVAL_SPLITS = ("valid", "test")
NEGATIVES_PER_USER = 19  # the LLMRank protocol ranks the held-out item among 20 candidates
# The cross-encoder's epoch is chosen on at most this many validation requests: every epoch scores them all,
# and the fusion may be fitted on many more (6,000 Games requests are 120,000 pairs, 13 minutes on 2 CPUs).
FINETUNE_VALID_REQUESTS = 1000
# Search gains are relevance - 1 (Home Depot's scale starts at 1 = irrelevant), in evaluation and training.
SEARCH_GAIN_OFFSET = 1.0


def _write_json(path: str | Path, value: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True, default=str))


def _read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# 1. ingest and validate


def ingest_step(
    source: str, data_dir: str | None, max_queries: int, max_users: int, seed: int, out_dir: str
) -> dict:
    """Canonical tables of `source` (sampled when asked) with a lineage manifest."""
    from fusionrank.data.ingest import ingest

    return ingest(source, out_dir, data_dir=data_dir, max_queries=max_queries, max_users=max_users, seed=seed)


def validate_step(dataset_dir: str, report_path: str, result_path: str) -> dict:
    """Run the expectation suites on a dataset folder; write the HTML report and the JSON result."""
    from fusionrank.validation import validate_tables

    # Ingest already conformed the types (a wrong type fails there, naming the column and values).
    tables = Tables.read(dataset_dir)
    sources = {name: str(Path(dataset_dir) / f"{name}.parquet") for name, _ in tables.items()}
    outcome = validate_tables(tables, sources=sources)
    outcome.write_html(report_path)
    outcome.write_json(result_path)
    return outcome.to_dict()


def assert_valid_data(verdict: str, result_path: str) -> None:
    """Raise ValidationFailed with the summary when validation did not pass."""
    if verdict == "passed":
        return
    from fusionrank.validation import ValidationOutcome

    outcome = ValidationOutcome.from_dict(_read_json(result_path))
    raise ValidationFailed(f"the input data failed validation; nothing was trained.\n{outcome.summary()}")


# 2. splits and features


def _mode(tables: Tables) -> str:
    return tables.modes[0]


def split_step(dataset_dir: str, out_dir: str, seed: int, valid_frac: float, test_frac: float) -> dict:
    """Split by query (search) or leave-last-out per user (recommendation)."""
    from fusionrank.splits import split_recommendation, split_search

    tables = Tables.read(dataset_dir)
    mode = _mode(tables)
    if mode == "search":
        parts = split_search(tables.judgments, valid_frac=valid_frac, test_frac=test_frac, seed=seed)
    else:
        parts = split_recommendation(tables.interactions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in parts.items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
    info = {"mode": mode, "rows": {name: len(frame) for name, frame in parts.items()}}
    _write_json(out / "split.json", info)
    return info


def read_splits(splits_dir: str | Path) -> tuple[str, dict[str, pd.DataFrame]]:
    """The mode and the train/valid/test frames a `split_step` wrote."""
    splits_dir = Path(splits_dir)
    info = _read_json(splits_dir / "split.json")
    return info["mode"], {name: pd.read_parquet(splits_dir / f"{name}.parquet") for name in SPLIT_NAMES}


def features_step(
    dataset_dir: str, splits_dir: str, store_dir: str, version: str, env: str = "local"
) -> dict:
    """Materialize the Feast feature views of this run's data (training data only where it matters).

    `env` picks the feature_store yaml: "local" (SQLite online store under the run's folder) or "cluster"
    (Redis and a shared registry, configured by the FUSIONRANK_FEAST_* and FUSIONRANK_REDIS variables that
    feature_repo/feature_store.cluster.yaml names).
    """
    from fusionrank.features import materialize_features

    tables = Tables.read(dataset_dir)
    mode, parts = read_splits(splits_dir)
    train_tables = Tables(
        products=tables.products,
        judgments=parts["train"] if mode == "search" else None,
        interactions=parts["train"] if mode == "recommendation" else None,
    )
    info = materialize_features(
        train_tables,
        Path(store_dir),
        feature_service=f"fusionrank_ranker_{version}",
        env=env,
        train_judgments=parts["train"] if mode == "search" else None,
    )
    _write_json(Path(store_dir) / STORE_INFO, info.to_dict())
    return info.to_dict()


def read_store_info(store_dir: str | Path):
    """The `FeatureStoreInfo` a `features_step` left in `store_dir`."""
    from fusionrank.features import FeatureStoreInfo

    return FeatureStoreInfo.from_dict(_read_json(Path(store_dir) / STORE_INFO))


def feature_frame(
    store_dir: str | Path, examples: list[RankingExample], parts: dict[str, pd.DataFrame], which: str
) -> pd.DataFrame:
    """Point-in-time features of every (request, candidate) as `f_<name>` columns, keyed by qid and product.

    A search request is asked as of the store's snapshot; a recommendation request just before its
    held-out event, so no feature can see the event it predicts.
    """
    from fusionrank.features import training_frame

    info = read_store_info(store_dir)
    qids = [e.qid for e in examples for _ in e.candidates]
    products = [pid for e in examples for pid in e.candidates]
    entity = pd.DataFrame({"qid": qids, "product_id": products})
    if examples and examples[0].context.user_id is not None:
        held_out = parts[which].drop_duplicates("user_id").set_index(parts[which]["user_id"].astype(str))
        users = [e.context.user_id for e in examples for _ in e.candidates]
        entity["user_id"] = users
        entity["event_timestamp"] = held_out.loc[users, "event_timestamp"].to_numpy() - pd.Timedelta(1, "us")
    else:
        entity["event_timestamp"] = info.as_of
    entity["event_timestamp"] = pd.to_datetime(entity["event_timestamp"], utc=True)
    values = training_frame(info, entity)
    numeric = [
        name
        for name in info.feature_names
        if name in values.columns and pd.api.types.is_numeric_dtype(values[name])
    ]
    out = values[["qid", "product_id"]].copy()
    for name in numeric:
        out[f"f_{name}"] = values[name].astype("float64").to_numpy()
    return out


# 3. traditional signals and candidate frames


def fit_signals(
    tables: Tables,
    mode: str,
    train: pd.DataFrame,
    valid: pd.DataFrame | None = None,
    sasrec: SASRecConfig | None = None,
) -> dict[str, object]:
    """The traditional signals of a mode, fitted on the training split only.

    For recommendation, `sasrec` adds the sequential signal, its epoch picked on the `valid` held-out events.
    """
    from fusionrank.protocols import EASE_L2, KNN_RECENCY_DECAY
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.cf import EASESignal, ItemKNNSignal
    from fusionrank.signals.popularity import PopularitySignal
    from fusionrank.signals.sequential import SASRecSignal

    if mode == "search":
        signals = [BM25Signal.fit(tables.products), PopularitySignal.fit_judgments(train)]
        return {signal.name: signal for signal in signals}
    counts = train["product_id"].value_counts()
    # EASE keeps items with enough events to estimate; on a small sample the threshold follows the data.
    min_count = int(min(10, max(2, counts.quantile(0.9))))
    signals = [
        PopularitySignal.fit(train),
        PopularitySignal.fit(train, window_days=7),
        ItemKNNSignal.fit(train, recency_decay=KNN_RECENCY_DECAY),
        EASESignal.fit(train, l2=EASE_L2, min_item_count=min_count),
    ]
    if sasrec is not None:
        signals.append(SASRecSignal.fit(train, valid=valid, config=sasrec, log=print))
    return {signal.name: signal for signal in signals}


def build_examples(
    tables: Tables,
    mode: str,
    parts: dict[str, pd.DataFrame],
    signals: dict[str, object],
    which: str,
    candidates_k: int,
    max_requests: int,
    seed: int,
) -> list[RankingExample]:
    """The evaluation requests of split `which`.

    Search: the BM25 top `candidates_k` over the whole catalog (unjudged products count as non-relevant), the
    realistic task. Recommendation: the held-out item among 19 others, as in the LLMRank protocol: the test
    requests are the users the published protocol lists (with its exact lists) when the data has them;
    validation users get uniformly sampled negatives.
    """
    from fusionrank.splits import recommendation_examples, search_examples

    if mode == "search":
        split = parts[which]
        if max_requests:
            queries = np.sort(split["query"].unique().astype(str))
            keep = np.random.default_rng(seed).permutation(queries)[:max_requests]
            split = split[split["query"].isin(set(keep))]
        return search_examples(
            split,
            candidates="retrieved",
            retriever=signals["bm25"],
            k=candidates_k,
            gain_offset=SEARCH_GAIN_OFFSET,
        )
    lists = _protocol_lists(tables, parts, which, seed)
    if which == "test" and tables.eval_candidates is not None:
        # the published protocol's users are the test set (a sampled run keeps them first)
        listed = tables.eval_candidates.loc[tables.eval_candidates["protocol"] == "llmrank-6k", "user_id"]
        listed_users = set(listed.astype(str))
        if listed_users & set(lists):
            lists = {user: items for user, items in lists.items() if user in listed_users}
    examples = recommendation_examples(parts, which=which, candidates=lists)
    if max_requests and len(examples) > max_requests:
        order = np.random.default_rng(seed).permutation(len(examples))[:max_requests]
        examples = [examples[i] for i in sorted(order)]
    return examples


def _protocol_lists(tables: Tables, parts: dict[str, pd.DataFrame], which: str, seed: int) -> dict[str, list]:
    held_out = parts[which]
    catalog = tables.products["product_id"].astype(str).to_numpy()
    rng = np.random.default_rng(seed + (0 if which == "valid" else 1))
    published: dict[str, list[str]] = {}
    if which == "test" and tables.eval_candidates is not None:
        listed = tables.eval_candidates[tables.eval_candidates["protocol"] == "llmrank-6k"]
        listed = listed.sort_values(["user_id", "position"])
        published = listed.groupby("user_id")["product_id"].agg(lambda s: list(s.astype(str))).to_dict()
    lists = {}
    for user, target in zip(held_out["user_id"].astype(str), held_out["product_id"].astype(str), strict=True):
        if user in published:
            others = [p for p in published[user] if p != target][:NEGATIVES_PER_USER]
        else:
            drawn = rng.choice(catalog, size=NEGATIVES_PER_USER + 1, replace=False)
            others = [p for p in drawn if p != target][:NEGATIVES_PER_USER]
        lists[user] = [target, *others]
    return lists


def candidates_step(
    dataset_dir: str,
    splits_dir: str,
    store_dir: str,
    signals_dir: str,
    frames_dir: str,
    candidates_k: int,
    max_eval_requests: int,
    seed: int,
    seq_epochs: int = 0,
    seq_max_seconds: float = 0.0,
) -> dict[str, float]:
    """Fit the traditional signals and write the valid/test candidate frames with signals and features.

    `seq_epochs` > 0 adds SASRec to a recommendation run (at most that many epochs, and `seq_max_seconds` of
    training when positive).
    """
    tables = Tables.read(dataset_dir)
    mode, parts = read_splits(splits_dir)
    sasrec = None
    if seq_epochs > 0 and mode == "recommendation":
        sasrec = SASRecConfig(epochs=seq_epochs, max_seconds=seq_max_seconds, seed=seed)
    signals = fit_signals(tables, mode, parts["train"], parts["valid"], sasrec)
    for name, signal in signals.items():
        signal.save(Path(signals_dir) / name)
    out = Path(frames_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {}
    for which in EVAL_SPLITS:
        examples = build_examples(tables, mode, parts, signals, which, candidates_k, max_eval_requests, seed)
        features = feature_frame(store_dir, examples, parts, which)
        frame = signal_frame(examples, signals, features)
        frame.to_parquet(out / f"{which}.parquet", index=False)
        contexts_frame(examples).to_parquet(out / f"{which}_contexts.parquet", index=False)
        qrels_frame(examples).to_parquet(out / f"{which}_qrels.parquet", index=False)
        figures[f"{which}_requests"] = float(len(examples))
        figures[f"{which}_candidates"] = float(len(frame))
        judged = sum(len(e.gains) for e in examples)
        found = sum(sum(1 for p in e.candidates if e.gains.get(p, 0) > 0) for e in examples)
        relevant = sum(sum(1 for g in e.gains.values() if g > 0) for e in examples)
        figures[f"{which}_candidate_recall"] = found / relevant if relevant else 0.0
        figures[f"{which}_judged"] = float(judged)
    info = {"mode": mode, "signals": sorted(signals), "candidates_k": candidates_k, **figures}
    _write_json(out / "frames.json", info)
    return figures


def read_frames(frames_dir: str | Path, which: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A split's candidate frame and its contexts table."""
    frames_dir = Path(frames_dir)
    return pd.read_parquet(frames_dir / f"{which}.parquet"), pd.read_parquet(
        frames_dir / f"{which}_contexts.parquet"
    )


# 4. BERT


def biencoder_config(
    epochs: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    seed: int,
    distill_weight: float = 1.0,
    teacher_scale: float = 1.0,
    group_size: int = 8,
    negatives: int = 7,
    hard_pool: int = 30,
    distill_loss: str = "margin_mse",
):
    """The bi-encoder step's training settings, every one checked (ConfigError naming it) before any work.

    `negatives` and `hard_pool` are `training_pairs`'s counts, the rest `BiEncoderConfig`'s.
    """
    from fusionrank.biencoder import BiEncoderConfig

    if negatives < 0 or hard_pool < 1:
        raise ConfigError(
            f"bi-encoder negatives must be 0 or more and hard_pool at least 1, got {negatives} and "
            f"{hard_pool}"
        )
    return BiEncoderConfig(
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
        distill_weight=distill_weight,
        teacher_scale=teacher_scale,
        group_size=group_size,
        distill_loss=distill_loss,
        seed=seed,
    )


def training_pairs(
    tables: Tables,
    mode: str,
    train: pd.DataFrame,
    max_groups: int,
    seed: int,
    retriever: object | None = None,
    negatives: int = 7,
    hard_pool: int = 30,
) -> pd.DataFrame:
    """Cross-encoder training pairs (context, text, label, group) from the training split only.

    Labels are on the gain scale evaluation uses. Search: every judged (query, title) pair with its graded
    gain (relevance - 1), plus `negatives` products the retriever (BM25) ranks in its top `hard_pool` for the
    query but nobody judged, as gain 0: the evaluation ranks retrieved candidates, most of them unjudged, so
    BERT must learn to push those down, which judged pairs alone (mostly relevant) never show it.
    Recommendation: for each user, the last training purchase is the positive (1), the purchases before it
    the context, and `negatives` products as 0, half from the retriever's (item-kNN) top `hard_pool` for
    that history, half drawn from the catalog (a listwise group).
    """
    from fusionrank.context import Context
    from fusionrank.text import context_text, product_text, query_text

    titles = dict(
        zip(tables.products["product_id"].astype(str), tables.products["title"].astype(str), strict=True)
    )
    catalog = tables.products["product_id"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)

    def hard(context: Context, exclude: set[str], count: int) -> list[str]:
        if retriever is None or count <= 0:
            return []
        pool = [pid for pid, _ in retriever.retrieve(context, hard_pool) if pid not in exclude]
        return list(rng.permutation(pool)[:count]) if pool else []

    records: list[tuple[str, str, float, str]] = []
    if mode == "search":
        rows = train
        if max_groups and rows["query"].nunique() > max_groups:
            keep = rng.permutation(np.sort(rows["query"].unique().astype(str)))[:max_groups]
            rows = rows[rows["query"].isin(set(keep))]
        for query, judged in rows.groupby("query", sort=True):
            text = query_text(str(query))
            ids = judged["product_id"].astype(str).tolist()
            gains = (judged["relevance"].to_numpy(dtype=float) - SEARCH_GAIN_OFFSET).clip(min=0.0)
            pairs = list(zip(ids, gains, strict=True))
            pairs += [(pid, 0.0) for pid in hard(Context(query=str(query)), set(ids), negatives)]
            records += [(text, product_text(titles.get(pid, "")), float(g), str(query)) for pid, g in pairs]
        return pd.DataFrame(records, columns=["context", "text", "label", "group"])
    ordered = train.sort_values(["user_id", "event_timestamp"], kind="stable")
    sequences = ordered.groupby("user_id", sort=True)["product_id"].agg(lambda s: list(s.astype(str)))
    sequences = sequences[sequences.map(len) >= 2]
    if max_groups and len(sequences) > max_groups:
        sequences = sequences.iloc[np.sort(rng.permutation(len(sequences))[:max_groups])]
    for user, sequence in sequences.items():
        target, history = sequence[-1], tuple(sequence[:-1])
        context = Context(user_id=str(user), history=history)
        text = context_text(context, titles)
        exclude = {target, *history}
        picked = hard(context, exclude, negatives // 2)
        drawn = [p for p in rng.choice(catalog, size=negatives * 2, replace=False) if p not in exclude]
        picked += [p for p in drawn if p not in picked][: negatives - len(picked)]
        for pid, label in [(target, 1.0)] + [(p, 0.0) for p in picked]:
            records.append((text, product_text(titles.get(pid, "")), label, str(user)))
    return pd.DataFrame(records, columns=["context", "text", "label", "group"])


def finetune_source(
    source: str,
    out_dir: str | Path,
    config,
    data_dir: str | Path | None = None,
    max_queries: int = 0,
    max_users: int = 0,
    max_train_samples: int = 0,
    max_valid_samples: int = 200,
    base_model: str | Path | None = None,
    tiny: bool = False,
    seed: int = 0,
) -> dict:
    """Fine-tune the cross-encoder on a source outside the pipeline (`fusionrank finetune`).

    The same splits, retrievers and pairs as the pipeline: training pairs from the training split with hard
    negatives, early stopping on pairs from the validation split; the checkpoint lands in `out_dir/model`.
    """
    from fusionrank.bert import default_base_model, finetune_cross_encoder, make_tiny_bert
    from fusionrank.data.ingest import load_tables
    from fusionrank.data.sources import sample
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.cf import ItemKNNSignal
    from fusionrank.splits import split_recommendation, split_search

    tables = sample(load_tables(source, data_dir)[0], max_queries=max_queries, max_users=max_users, seed=seed)
    mode = _mode(tables)
    config = dataclasses.replace(config, loss="mse" if mode == "search" else "listwise")
    out = Path(out_dir)
    if mode == "search":
        parts = split_search(tables.judgments, seed=seed)
        retriever = BM25Signal.fit(tables.products)
        valid_events = parts["valid"]
    else:
        parts = split_recommendation(tables.interactions)
        retriever = ItemKNNSignal.fit(parts["train"])
        # each validation user's sequence up to the held-out event: its last event is the positive
        valid_users = set(parts["valid"]["user_id"])
        valid_events = pd.concat([parts["train"], parts["valid"]])
        valid_events = valid_events[valid_events["user_id"].isin(valid_users)]
    train = training_pairs(tables, mode, parts["train"], max_train_samples, seed, retriever=retriever)
    valid = training_pairs(tables, mode, valid_events, max_valid_samples, seed + 1, retriever=retriever)
    base = make_tiny_bert(out / "tiny-base") if tiny else Path(base_model or default_base_model())
    return finetune_cross_encoder(train, valid, base, out / "model", config)


def _bert_frame(frame: pd.DataFrame, contexts: pd.DataFrame, titles: dict[str, str]) -> pd.DataFrame:
    """A candidate frame as (context, text, label, group) for the cross-encoder's validation."""
    from fusionrank.text import context_text, product_text

    texts = {e.qid: context_text(e.context, titles) for e in examples_from_frames(frame, contexts)}
    return pd.DataFrame(
        {
            "context": frame["qid"].map(texts).to_numpy(),
            "text": [product_text(titles.get(p, "")) for p in frame["product_id"]],
            "label": frame["gain"].to_numpy(dtype=float),
            "group": frame["qid"].to_numpy(),
        }
    )


def _sample_requests(frame: pd.DataFrame, max_requests: int, seed: int) -> pd.DataFrame:
    """The rows of at most `max_requests` of the frame's requests (a seeded draw), in frame order."""
    qids = pd.unique(frame["qid"])
    if len(qids) <= max_requests:
        return frame
    keep = np.random.default_rng(seed).choice(qids, size=max_requests, replace=False)
    return frame[frame["qid"].isin(set(keep))].reset_index(drop=True)


def finetune_step(
    dataset_dir: str,
    splits_dir: str,
    signals_dir: str,
    frames_dir: str,
    base_model: str,
    tiny_model: bool,
    epochs: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    max_train_samples: int,
    max_steps: int,
    seed: int,
    bert_dir: str,
    scored_dir: str,
) -> dict[str, float]:
    """Fine-tune the cross-encoder on the training split, then add `s_bert` to the valid/test frames."""
    import shutil

    from fusionrank.bert import (
        CrossEncoder,
        FinetuneConfig,
        default_base_model,
        finetune_cross_encoder,
        make_tiny_bert,
    )
    from fusionrank.ranker import bert_scores

    tables = Tables.read(dataset_dir)
    mode, parts = read_splits(splits_dir)
    titles = dict(
        zip(tables.products["product_id"].astype(str), tables.products["title"].astype(str), strict=True)
    )
    if tiny_model:
        base = make_tiny_bert(Path(bert_dir).parent / "tiny-base")
    else:
        base = Path(base_model) if base_model else default_base_model()
    config = FinetuneConfig(
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
        max_steps=max_steps or None,
        seed=seed,
        loss="mse" if mode == "search" else "listwise",
    )
    from fusionrank.signals.base import load_signal

    retriever = load_signal(Path(signals_dir) / ("bm25" if mode == "search" else "item_knn"))
    pairs = training_pairs(tables, mode, parts["train"], max_train_samples, seed, retriever=retriever)
    valid_frame, valid_contexts = read_frames(frames_dir, "valid")
    monitor = _sample_requests(valid_frame, FINETUNE_VALID_REQUESTS, seed)
    monitor_pairs = _bert_frame(monitor, valid_contexts, titles)
    metrics = finetune_cross_encoder(pairs, monitor_pairs, base, bert_dir, config)
    encoder = CrossEncoder.load(bert_dir)
    out = Path(scored_dir)
    out.mkdir(parents=True, exist_ok=True)
    for which in EVAL_SPLITS:
        frame, contexts = read_frames(frames_dir, which)
        frame["s_bert"] = bert_scores(encoder, examples_from_frames(frame, contexts), titles)
        frame.to_parquet(out / f"{which}.parquet", index=False)
        for extra in ("contexts", "qrels"):
            shutil.copy(Path(frames_dir) / f"{which}_{extra}.parquet", out / f"{which}_{extra}.parquet")
    shutil.copy(Path(frames_dir) / "frames.json", out / "frames.json")
    figures = {"train_pairs": float(len(pairs))}
    figures.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    return figures


# 4b. the bi-encoder: distilled from the cross-encoder, dense signal, hybrid candidates

RECALL_K = 100
BI_VALID_REQUESTS = 60


def embed_ids(tables: Tables, frames: list[pd.DataFrame], max_products: int, seed: int) -> list[str] | None:
    """The products a run embeds: the whole catalog when `max_products` is 0, else every candidate of the
    evaluation frames (so each gets a dense score) plus a seeded random draw of the rest of the catalog.

    A sampled catalog makes dense retrieval's recall a lower bound (a judged product outside the draw cannot
    be retrieved); the full run embeds everything.
    """
    catalog = tables.products["product_id"].astype(str)
    if not max_products or max_products >= len(catalog):
        return None
    chosen = dict.fromkeys(p for frame in frames for p in frame["product_id"].astype(str))
    rest = np.setdiff1d(catalog.to_numpy(), np.fromiter(chosen, dtype=object, count=len(chosen)))
    extra = max(0, max_products - len(chosen))
    drawn = np.random.default_rng(seed).permutation(np.sort(rest))[:extra]
    return [*chosen, *drawn.tolist()]


def generator_recall(
    examples: list[RankingExample], generators: dict[str, Callable[[Context], list[str]]]
) -> dict[str, float]:
    """Mean recall over requests of each candidate generator (a function from a context to product ids)
    against every judged relevant product, retrieved or not; requests without one are left out."""
    recall: dict[str, list[float]] = {name: [] for name in generators}
    for example in examples:
        relevant = {p for p, g in example.gains.items() if g > 0}
        if not relevant:
            continue
        for name, generator in generators.items():
            recall[name].append(len(relevant.intersection(generator(example.context))) / len(relevant))
    return {name: float(np.mean(values)) if values else float("nan") for name, values in recall.items()}


class _Memo:
    """A retriever that remembers its answers (the longest asked for) per context."""

    def __init__(self, retriever) -> None:
        self.retriever = retriever
        self.name = getattr(retriever, "name", "")
        self.answers: dict[Context, list[tuple[str, float]]] = {}

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        known = self.answers.get(context)
        if known is None or len(known) < k:
            known = self.answers[context] = self.retriever.retrieve(context, max(k, RECALL_K))
        return known[:k]

    def prefetch(self, contexts: Sequence[Context], k: int) -> None:
        """Answer `contexts` ahead, together where the retriever can (a dense one's `retrieve_batch`)."""
        batch = getattr(self.retriever, "retrieve_batch", None)
        missing = [c for c in dict.fromkeys(contexts) if c not in self.answers]
        if batch is not None and missing:
            self.answers.update(zip(missing, batch(missing, max(k, RECALL_K)), strict=True))


def recall_generators(
    first, first_name: str, dense, hybrid_k: int, k: int = RECALL_K, contexts: Sequence[Context] = ()
) -> dict[str, Callable[[Context], list[str]]]:
    """The candidate generators the evaluation report compares: the first-stage retriever's top `k`, the
    dense retriever's, the two fused by reciprocal rank at the same budget, and, with `hybrid_k`, the
    hybrid candidates as the pipeline and the server build them (the top `k` plus the dense top
    `hybrid_k` that it missed: up to `k + hybrid_k` products). The dense retriever answers `contexts`, the
    requests to come, in one batch."""
    from fusionrank.signals.dense import dense_extras, fused_retrieve

    # every generator asks the same two retrievers about the same context: ask each once
    first, dense = _Memo(first), _Memo(dense)
    dense.prefetch(contexts, k)

    def top(retriever) -> Callable[[Context], list[str]]:
        return lambda context: [pid for pid, _ in retriever.retrieve(context, k)]

    generators = {
        first_name: top(first),
        dense.name: top(dense),
        f"rrf@{k}": lambda context: fused_retrieve([first, dense], context, k),
    }
    if hybrid_k > 0:

        def hybrid(context: Context) -> list[str]:
            found = top(first)(context)
            return found + dense_extras(dense, context, set(found), hybrid_k)

        generators[f"hybrid@{k}+{hybrid_k}"] = hybrid
    return generators


def biencoder_step(
    dataset_dir: str,
    splits_dir: str,
    store_dir: str,
    signals_dir: str,
    bert_dir: str,
    scored_dir: str,
    base_model: str,
    tiny_model: bool,
    epochs: int,
    batch_size: int,
    max_length: int,
    learning_rate: float,
    max_train_samples: int,
    embed_max_products: int,
    hybrid_k: int,
    int8: bool,
    seed: int,
    out_signals_dir: str,
    out_scored_dir: str,
    user_vectors_max: int = -1,
    distill_weight: float = 1.0,
    teacher_scale: float = 1.0,
    group_size: int = 8,
    negatives: int = 7,
    hard_pool: int = 30,
    distill_loss: str = "margin_mse",
) -> dict[str, float]:
    """Distil the fine-tuned cross-encoder into a bi-encoder; add the dense signal to the run.

    The bi-encoder trains on training pairs built as the cross-encoder's are (`training_pairs`: judged
    pairs plus `negatives` unjudged products of the retriever's top `hard_pool`; 7 of 30 as for the
    cross-encoder unless set) with the cross-encoder's scores as the teacher (`distill_loss`: margin-MSE
    or listwise KL) beside in-batch negatives, keeping the epoch with the best NDCG@10 on the validation
    candidates. The catalog's embeddings are saved with the model as
    the `dense` signal, written beside the traditional signals (`out_signals_dir`). The scored frames gain
    `s_dense` for every candidate; with `hybrid_k` > 0 a search request's candidates also gain the dense
    retriever's top `hybrid_k` that BM25 missed (hybrid retrieval), scored by every signal. Returns training
    figures and recall@100 of each candidate generator and of their fusion, on valid and test.

    The context vector of each user's history as the feature store holds it (the `user_vectors_max` most
    recently active users; -1 every user, 0 none) is computed here too and saved with the signal
    (`DenseSignal.precompute`): a served request that reads its history from the store then runs no
    encoder. It is computed after the frames are scored, so the run's figures never read it.
    """
    import hashlib
    import shutil
    import tempfile

    from fusionrank.bert import CrossEncoder, default_base_model, make_tiny_bert
    from fusionrank.biencoder import BiEncoder, finetune_bi_encoder
    from fusionrank.signals.base import load_signal
    from fusionrank.signals.dense import DenseSignal

    config = biencoder_config(
        epochs,
        batch_size,
        max_length,
        learning_rate,
        seed,
        distill_weight=distill_weight,
        teacher_scale=teacher_scale,
        group_size=group_size,
        negatives=negatives,
        hard_pool=hard_pool,
        distill_loss=distill_loss,
    )
    tables = Tables.read(dataset_dir)
    mode, parts = read_splits(splits_dir)
    titles = dict(
        zip(tables.products["product_id"].astype(str), tables.products["title"].astype(str), strict=True)
    )
    signals = {p.name: load_signal(p) for p in sorted(Path(signals_dir).iterdir()) if p.is_dir()}
    retriever = signals["bm25" if mode == "search" else "item_knn"]
    teacher = CrossEncoder.load(bert_dir)
    pairs = training_pairs(
        tables,
        mode,
        parts["train"],
        max_train_samples,
        seed,
        retriever=retriever,
        negatives=negatives,
        hard_pool=hard_pool,
    )
    pairs["teacher"] = teacher.score(pairs["context"].tolist(), pairs["text"].tolist())
    valid_frame, valid_contexts = read_frames(scored_dir, "valid")
    frames = {which: read_frames(scored_dir, which) for which in EVAL_SPLITS}
    with tempfile.TemporaryDirectory(prefix="fusionrank-biencoder-") as scratch:
        if tiny_model:
            base = make_tiny_bert(Path(scratch) / "tiny-base")
        else:
            base = Path(base_model) if base_model else default_base_model()
        work = Path(scratch) / "checkpoint"
        valid_pairs = _bert_frame(valid_frame, valid_contexts, titles)
        groups = np.sort(valid_pairs["group"].unique())
        if len(groups) > BI_VALID_REQUESTS:
            # epoch selection needs a stable figure, not every request: each costs ~candidates_k embeddings
            keep = set(np.random.default_rng(seed).permutation(groups)[:BI_VALID_REQUESTS])
            valid_pairs = valid_pairs[valid_pairs["group"].isin(keep)].reset_index(drop=True)
        metrics = finetune_bi_encoder(pairs, valid_pairs, base, work, config)
        ids = embed_ids(tables, [frame for frame, _ in frames.values()], embed_max_products, seed)
        dense = DenseSignal.build(BiEncoder.load(work), tables.products, ids, int8=int8)
    shutil.copytree(signals_dir, out_signals_dir, dirs_exist_ok=True)
    from fusionrank.features import write_product_embeddings

    version = "dense-" + hashlib.sha256(dense.embeddings.tobytes()).hexdigest()[:16]
    store = read_store_info(store_dir)
    written = write_product_embeddings(store, dense.index.ids, dense.embeddings, version)

    out = Path(out_scored_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {
        "train_pairs": float(len(pairs)),
        "train_groups": float(metrics["train_groups"]),
        "embedded_products": float(len(dense.index)),
        "catalog_coverage": dense.coverage,
        "feature_store_embedding_seconds": written["seconds"],
        **{k: float(v) for k, v in metrics.items() if k.startswith("valid_")},
    }
    popular = signals.get("popularity")
    recall: dict[str, dict[str, float]] = {}
    for which, (frame, contexts) in frames.items():
        qrels = pd.read_parquet(Path(scored_dir) / f"{which}_qrels.parquet")
        examples = examples_from_frames(frame, contexts, qrels)
        first = retriever if mode == "search" else FallbackRetriever(retriever, popular)
        hybrid = hybrid_k if mode == "search" else 0
        generators = recall_generators(
            first, retriever.name, dense, hybrid, contexts=[e.context for e in examples]
        )
        recall[which] = generator_recall(examples, generators)
        for name, value in recall[which].items():
            figures[f"{which}_recall@{RECALL_K}_{name}"] = value
        if mode == "search" and hybrid_k > 0:
            frame = _add_dense_candidates(
                frame, examples, dense, hybrid_k, signals, teacher, titles, store_dir, parts, which
            )
        frame = frame.copy()
        current = examples_from_frames(frame, contexts)
        scores = dense.score_batch([e.context for e in current], [e.candidates for e in current])
        frame["s_dense"] = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        figures[f"{which}_candidates"] = float(len(frame))
        frame.to_parquet(out / f"{which}.parquet", index=False)
        for extra in ("contexts", "qrels"):
            shutil.copy(Path(scored_dir) / f"{which}_{extra}.parquet", out / f"{which}_{extra}.parquet")
    started = time.perf_counter()
    kept = precompute_store_histories(dense, store, user_vectors_max)
    figures["precomputed_user_vectors"] = float(kept)
    figures["precompute_user_vectors_seconds"] = time.perf_counter() - started
    dense.save(Path(out_signals_dir) / dense.name)
    info = _read_json(Path(scored_dir) / "frames.json")
    info["signals"] = sorted({*info["signals"], dense.name})
    info["hybrid_k"] = hybrid_k if mode == "search" else 0
    info["generator_recall"] = recall
    _write_json(out / "frames.json", info)
    return figures


def precompute_store_histories(dense, info, max_users: int = -1) -> int:
    """Give `dense` the vector of each user's history as the feature store `info` holds it (the
    `max_users` most recently active; -1 all): the context a served request without its own history reads.
    Returns how many distinct texts it keeps."""
    from fusionrank.features import latest_user_histories

    histories = latest_user_histories(info, max_users)
    return dense.precompute([Context(user_id=user, history=history) for user, history in histories])


def _add_dense_candidates(
    frame: pd.DataFrame,
    examples: list[RankingExample],
    dense,
    hybrid_k: int,
    signals: dict[str, object],
    teacher,
    titles: dict[str, str],
    store_dir: str,
    parts: dict[str, pd.DataFrame],
    which: str,
) -> pd.DataFrame:
    """`frame` with each request's dense top `hybrid_k` that it lacks, every signal computed for them."""
    from fusionrank.ranker import bert_scores
    from fusionrank.signals.dense import dense_extras_batch

    haves = [set(example.candidates) for example in examples]
    extras = dense_extras_batch(dense, [example.context for example in examples], haves, hybrid_k)
    added = [
        RankingExample(example.context, extra, example.gains)
        for example, extra in zip(examples, extras, strict=True)
        if extra
    ]
    if not added:
        return frame
    traditional = {name: s for name, s in signals.items() if name != dense.name}
    rows = signal_frame(added, traditional, feature_frame(store_dir, added, parts, which))
    rows["s_bert"] = bert_scores(teacher, added, titles)
    merged = pd.concat([frame, rows[frame.columns.intersection(rows.columns)]], ignore_index=True)
    # each request's rows together, BM25's candidates first, in the order the frames were written
    order = {qid: i for i, qid in enumerate(dict.fromkeys(frame["qid"]))}
    merged["_order"] = merged["qid"].map(order)
    return merged.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


# 5. fusion, evaluation, drift, gate


def fusion_step(scored_dir: str, fusion_dir: str, cascade_k: int, seed: int) -> dict:
    """Fit every fusion on the validation frame, and select the one the gate and the server use.

    Selection is honest: each strategy is fitted on two thirds of the validation requests and scored
    (NDCG@10) on the other third; the winner, like every strategy, is then refitted on all of them.
    """
    from fusionrank.fusion import fit_all, ranking_metrics, score_candidates

    valid, _ = read_frames(scored_dir, "valid")
    signals = [c for c in valid.columns if c.startswith(("s_", "f_"))]
    qids = np.sort(valid["qid"].unique().astype(str))
    held = set(np.random.default_rng(seed).permutation(qids)[: len(qids) // 3])
    selection: dict[str, float] = {}
    if len(held) >= 3:
        in_held = valid["qid"].astype(str).isin(held)
        trial = fit_all(valid[~in_held].reset_index(drop=True), signals, cascade_k=cascade_k, seed=seed)
        part = valid[in_held].reset_index(drop=True)
        for kind, model in trial.items():
            selection[kind] = float(
                ranking_metrics(score_candidates(model, part), "score", ["ndcg@10"])["ndcg@10"]
            )
    models = fit_all(valid, signals, cascade_k=cascade_k, seed=seed)
    for kind, model in models.items():
        model.save(Path(fusion_dir) / kind)
    # Too few requests to hold any out: the weighted fusion, which has the fewest parameters to overfit.
    selected = max(selection, key=selection.get) if selection else "weighted"
    info = {
        "fusions": sorted(models),
        "selected": selected,
        "signals": signals,
        "selection_ndcg@10": selection,
    }
    _write_json(Path(fusion_dir) / "fusion.json", info)
    return info


def evaluate_step(
    scored_dir: str,
    fusion_dir: str,
    registry_uri: str,
    model_name: str,
    evaluation_path: str,
    table_path: str,
    source: str = "",
    report_dir: str | None = None,
) -> dict[str, float]:
    """Every single signal and every fusion on the test frame; the candidate against the champion.

    With `report_dir`, also the fusion report of this run (`fusionrank.report`: Markdown, JSON and a PNG of
    NDCG@10 per method, the published figures of `source` beside ours, the cascade's k swept)."""
    from fusionrank.champion import evaluate_candidate

    result = evaluate_candidate(Path(scored_dir), Path(fusion_dir), registry_uri, model_name)
    _write_json(evaluation_path, result)
    Path(table_path).write_text(result["markdown"])
    if report_dir is not None:
        from fusionrank.report import report_from_run, write_report

        dataset = source or _read_json(Path(scored_dir) / "frames.json")["mode"]
        write_report([report_from_run(dataset, scored_dir, fusion_dir)], report_dir)
    return {k: float(v) for k, v in result["headline"].items()}


def drift_step(
    scored_dir: str, fusion_dir: str, registry_uri: str, model_name: str, html_path: str, result_path: str
) -> dict:
    """Evidently drift of this run's validation frame (features, signals, score) against the champion's."""
    from fusionrank.champion import drift_against_champion

    result = drift_against_champion(
        Path(scored_dir), Path(fusion_dir), registry_uri, model_name, Path(html_path)
    )
    _write_json(result_path, result)
    return result


def gate_step(evaluation_path: str, drift_path: str, gate_config: dict, decision_path: str) -> dict:
    """The gate's decision, with every reason, from the evaluation, the drift result and the config."""
    from fusionrank.gate import GateConfig, decide

    config = GateConfig.from_dict(gate_config)
    evaluation = _read_json(evaluation_path)
    drift = _read_json(drift_path)
    decision = decide(
        evaluation["candidate"],
        evaluation.get("champion"),
        drift if drift.get("checked") else None,
        config,
        p_value=evaluation.get("p_value"),
    )
    result = decision.to_dict()
    _write_json(decision_path, result)
    return result


def rejection_summary(decision_path: str, out_path: str) -> None:
    """A Markdown page saying why the gate rejected the candidate."""
    decision = _read_json(decision_path)
    lines = ["# Candidate rejected", "", "Nothing was packaged or registered.", "", "## Reasons", ""]
    lines += [f"- {reason}" for reason in decision["reasons"]]
    Path(out_path).write_text("\n".join(lines) + "\n")


# 6. package and register


def package_step(
    dataset_dir: str,
    signals_dir: str,
    bert_dir: str,
    fusion_dir: str,
    store_dir: str,
    scored_dir: str,
    data_hash: str,
    feature_service: str,
    bundle_dir: str,
    git_revision: str = "",
    rerank_k_cpu: int = -1,
    rerank_k_gpu: int = -1,
    int8: bool = False,
) -> dict:
    """Assemble the ranker bundle, save it to the BentoML model store, build the Bento and check its contract.

    A Bento that fails the contract check (the InfraValidator equivalent) stops the run here, so nothing
    that cannot serve is ever registered or promoted.
    """
    from fusionrank.errors import ContractViolation
    from fusionrank.packaging import contract_check, save_to_bentoml

    tables = Tables.read(dataset_dir)
    fusion_info = _read_json(Path(fusion_dir) / "fusion.json")
    frames_info = _read_json(Path(scored_dir) / "frames.json")
    from fusionrank.champion import scored_reference

    reference = scored_reference(Path(scored_dir), Path(fusion_dir))
    manifest = {
        "mode": frames_info["mode"],
        "signals": frames_info["signals"],
        "fusions": fusion_info["fusions"],
        "selected_fusion": fusion_info["selected"],
        "fusion_signals": fusion_info["signals"],
        "feature_service": feature_service,
        "feature_store": str(Path(store_dir).resolve()),
        "data_hash": data_hash,
        "git_revision": git_revision or os.environ.get("FUSIONRANK_GIT_REVISION") or _checkout_revision(),
        "serving": serving_config(
            frames_info.get("hybrid_k", 0),
            rerank_k_cpu,
            rerank_k_gpu,
            int8,
            frames_info.get("candidates_k") if frames_info["mode"] == "search" else None,
        ),
    }
    write_bundle(bundle_dir, manifest, tables.products, signals_dir, fusion_dir, bert_dir, reference)
    saved = save_to_bentoml(Path(bundle_dir), manifest)
    check = contract_check(saved["bento"])
    if not check["passed"]:
        raise ContractViolation(
            f"Bento {saved['bento']} failed its contract check: " + "; ".join(check["failures"])
        )
    return {**saved, "contract_requests": check["requests"]}


def serving_config(
    hybrid_k: int, rerank_k_cpu: int, rerank_k_gpu: int, int8: bool, retrieve_k: int | None = None
) -> dict:
    """How the server runs this bundle: the candidates it retrieves and the dense ones it adds
    (`retrieve_k`, `hybrid_k`, as the evaluation did),
    how many candidates per request the cross-encoder re-scores on a CPU and on a GPU (a negative number:
    every candidate, as evaluated; 0: never), and whether CPU inference is int8. FUSIONRANK_RERANK_K and
    FUSIONRANK_INT8 override them when serving."""
    return {
        "retrieve_k": None if retrieve_k is None else int(retrieve_k),
        "hybrid_k": int(hybrid_k),
        "int8": bool(int8),
        "rerank_k_cpu": None if rerank_k_cpu < 0 else int(rerank_k_cpu),
        "rerank_k_gpu": None if rerank_k_gpu < 0 else int(rerank_k_gpu),
    }


def _checkout_revision() -> str:
    from fusionrank.revision import git_revision

    return git_revision()


def register_step(
    bundle_dir: str,
    evaluation_path: str,
    registry_uri: str,
    model_name: str,
    run_id: str,
    bento: str,
    promote: bool,
) -> str:
    """Register the bundle (once per run) and, when asked, promote it to champion."""
    from fusionrank.registry import Registry

    if not run_id:
        raise ConfigError("register needs the pipeline run id to keep registration idempotent")
    manifest = _read_json(Path(bundle_dir) / "manifest.json")
    evaluation = _read_json(evaluation_path)
    registry = Registry(registry_uri, model_name)
    tags = {
        "data_hash": manifest["data_hash"],
        "feature_service": manifest["feature_service"],
        "git_revision": manifest["git_revision"],
        "bento": bento,
        "mode": manifest["mode"],
        "fusion": manifest["selected_fusion"],
    }
    version = registry.register(bundle_dir, run_id, tags, metrics=evaluation["candidate"])
    if promote:
        registry.promote(version.version)
    return f"registered:{version.version}"
