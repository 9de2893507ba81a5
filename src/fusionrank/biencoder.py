"""The bi-encoder: contexts and products embedded apart, scored by a dot product; trained by distillation.

A cross-encoder reads (context, product) together and is accurate but costs one forward pass per candidate;
a bi-encoder embeds each side alone, so product embeddings are computed once, offline, and a request pays
one short forward pass (its context) plus a dot product per candidate, cheap enough to score and retrieve
over the whole catalog. The fine-tuned cross-encoder's knowledge reaches it by distillation: a margin-MSE
loss (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
Distillation") makes the bi-encoder's score margin between the positive and each other product of a group
match the cross-encoder's margin, beside an in-batch contrastive loss over every product of the batch.
A listwise loss (`BiEncoderConfig.distill_loss`) makes the student's score distribution over a group's
whole list match the teacher's instead.

Like `fusionrank.bert`, this module needs torch, transformers, numpy and pandas only, so the same code
trains on a GPU node (bf16) and, with a tiny model, on a CPU in tests.

Training frames are pair frames (`context`, `text`, `label`, `group`, see `fusionrank.bert`) with an
optional `teacher` column (the cross-encoder's score of the pair). Each group with a positive label becomes
one training item: its best-labelled pair is the anchor, the group's other pairs its hard negatives (pairs
labelled relevant too are not treated as negatives of the anchor).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fusionrank import __version__
from fusionrank.bert import (
    NDCG_K,
    _batch_tokens,
    _longest_first,
    _model_inputs,
    _restore_order,
    check_pairs,
    encode_pairs,
    evaluating,
    ndcg_at_k,
    resolve_device,
)
from fusionrank.errors import ConfigError

BIENCODER_JSON = "biencoder.json"
TEACHER_COLUMN = "teacher"
DISTILL_LOSSES = ("margin_mse", "listwise")


@dataclass
class BiEncoderConfig:
    """Settings of one bi-encoder fine-tuning run; impossible values raise ConfigError.

    `batch_size` counts groups (a context with its anchor and up to `group_size - 1` other products); every
    product of the batch is a negative of every other group's context (in-batch negatives). `temperature`
    sets the scale of the student's scores (cosine / temperature), on which both losses act.
    `distill_weight` weighs the margin-MSE loss against the contrastive one (0 turns distillation off).
    `teacher_scale` multiplies the teacher's margins before they are compared with the student's: the
    student's scores lie up to 2 / `temperature` apart (40 at 0.05), a regression cross-encoder's within
    about the label range (1.5 on Home Depot), so at 1 the margin-MSE pulls the student's margins far below
    the ones the contrastive loss asks for.
    `distill_loss` picks the distillation term: "margin_mse" compares each non-anchor's margin below the
    anchor, teacher's against student's (Hofstaetter et al. 2020); "listwise" is the KL divergence from the
    teacher's score distribution over a group (softmax of `teacher_scale` x its scores) to the student's
    (softmax of its cosine / `temperature`), which teaches the order of the whole list a group holds, as
    RocketQAv2's listwise distillation does (Ren et al. 2021).
    """

    max_length: int = 48
    batch_size: int = 32
    group_size: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 1
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    distill_weight: float = 1.0
    teacher_scale: float = 1.0
    distill_loss: str = "margin_mse"
    seed: int = 0
    max_train_groups: int | None = None
    max_steps: int | None = None
    early_stopping_patience: int = 1
    bf16: bool | None = None
    device: str | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not 3 <= self.max_length <= 8192:
            problems.append(f"max_length must be between 3 and 8192, got {self.max_length}")
        for name in ("batch_size", "epochs", "early_stopping_patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.group_size < 1:
            problems.append(f"group_size must be at least 1 (the anchor), got {self.group_size}")
        for name in ("learning_rate", "temperature", "teacher_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "distill_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be zero or positive, got {value}")
        if self.distill_loss not in DISTILL_LOSSES:
            known = ", ".join(DISTILL_LOSSES)
            problems.append(f"distill_loss must be one of {known}, got {self.distill_loss!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("max_train_groups", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 (or None for no limit), got {value}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be positive (or None), got {self.max_grad_norm}")
        if problems:
            raise ConfigError("invalid bi-encoder settings: " + "; ".join(problems))


def mean_pooled(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The unit-length mean of each row's token states over its real tokens (`keep`, [B, width])."""
    weights = keep.unsqueeze(-1).float()
    pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return functional.normalize(pooled, dim=-1)


class BiEncoder:
    """A text embedder: mean-pooled, L2-normalised token states of a BERT, so a dot product is a cosine."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = BiEncoderConfig.max_length,
        autocast_dtype: torch.dtype | None = None,
        onnx: Any = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        # what `finetune_bi_encoder` recorded of the training run (settings, figures); saved with the model
        self.record = record
        self.autocast_dtype = autocast_dtype
        # int8 inference: an ONNX Runtime session (`fusionrank.onnx_inference`) that encodes in its place
        self.onnx = onnx
        self.device = next(model.parameters()).device

    @property
    def quantized(self) -> bool:
        return self.onnx is not None

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: bool = False,
    ) -> BiEncoder:
        """Load a model folder (a checkpoint of `finetune_bi_encoder`, or any BERT such as MiniLM).

        `dtype=None`: bf16 on CUDA, fp32 on a CPU. `quantize=True` (CPU only) encodes with int8 weights on
        ONNX Runtime (`int8`).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a model folder (no config.json)")
        resolved = resolve_device(device)
        if quantize and resolved.type != "cpu":
            raise ConfigError("int8 dynamic quantization runs on a CPU only; load on the GPU without it")
        if dtype is None:
            dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
        model = AutoModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False).to(resolved).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        max_length, record = BiEncoderConfig.max_length, None
        if (path / BIENCODER_JSON).is_file():
            record = json.loads((path / BIENCODER_JSON).read_text())
            max_length = int(record["settings"]["max_length"])
        encoder = cls(model, tokenizer, max_length=max_length, record=record)
        return encoder.int8() if quantize else encoder

    def int8(self) -> BiEncoder:
        """A copy that encodes with int8 weights on ONNX Runtime (CPU inference only), about a tenth of the
        CPU time of PyTorch fp32 for one short text (`fusionrank.onnx_inference`). Activations are quantized
        per call, so a vector depends slightly on the texts encoded with it: encode one text per call where
        that matters (`DenseSignal` does)."""
        from fusionrank.onnx_inference import OnnxInt8Model

        onnx = OnnxInt8Model.from_torch(self.model, "embedding")
        return BiEncoder(self.model, self.tokenizer, self.max_length, onnx=onnx, record=self.record)

    def encode(self, texts: list[str] | tuple[str, ...], batch_size: int = 256) -> np.ndarray:
        """The unit-length float32 embedding of each text, in input order ([len(texts), dimension])."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encoded = encode_pairs(self.tokenizer, list(texts), None, self.max_length)
        if self.onnx is not None:
            sorted_rows = np.empty((len(texts), self.dimension), dtype=np.float32)
            for start, stop, index, width in _longest_first(encoded, batch_size):
                sorted_rows[start:stop] = self.onnx.run(*_batch_tokens(encoded, index, width))
            return _restore_order(encoded, sorted_rows)
        encoded = encoded.to(self.device)
        vectors = torch.empty((len(texts), self.dimension), dtype=torch.float32, device=self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else nullcontext()
        )
        with evaluating(self.model), torch.inference_mode(), autocast:
            for start, stop, index, width in _longest_first(encoded, batch_size):
                vectors[start:stop] = self._pooled(encoded, index, width)
            sorted_vectors = vectors.cpu().numpy()
        return _restore_order(encoded, sorted_vectors)

    def _pooled(self, encoded: Any, index: torch.Tensor, width: int) -> torch.Tensor:
        inputs, keep = _model_inputs(encoded, index, width, self.model)
        return mean_pooled(self.model(**inputs).last_hidden_state, keep)

    def save(self, output_dir: str | Path) -> Path:
        if self.quantized:
            raise ConfigError("save the fp32 bi-encoder; int8 is applied again when it is loaded")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        # the length it was trained at goes with it: loaded without it, it would encode at the default
        record = self.record or {"settings": {"max_length": self.max_length}}
        (output_dir / BIENCODER_JSON).write_text(json.dumps(record, indent=2))
        return output_dir


def pretrained_encoder(base_model: str | Path, device: str | torch.device | None = None) -> BiEncoder:
    """The base model as an embedder without fine-tuning (MiniLM-L6 is a sentence-embedding model)."""
    return BiEncoder.load(base_model, device=device)


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass
class _Groups:
    """Training items: each group's context id and its texts, the anchor first."""

    context_ids: np.ndarray  # [groups] row of the group's context in `contexts`
    text_ids: list[np.ndarray]  # per group: rows in `texts`, anchor first
    relevant: list[np.ndarray]  # per group: bool, the pair is labelled relevant (never a negative)
    teacher: list[np.ndarray]  # per group: teacher scores (NaN when none)
    contexts: list[str]
    texts: list[str]


def _training_groups(frame: pd.DataFrame, config: BiEncoderConfig, rng: np.random.Generator) -> _Groups:
    has_teacher = TEACHER_COLUMN in frame.columns
    context_codes, contexts = pd.factorize(frame["context"].astype(str))
    text_codes, texts = pd.factorize(frame["text"].astype(str))
    labels = frame["label"].to_numpy(dtype=np.float64)
    teacher = frame[TEACHER_COLUMN].to_numpy(dtype=np.float64) if has_teacher else np.full(len(frame), np.nan)
    group_codes = pd.factorize(frame["group"])[0]
    order = np.argsort(group_codes, kind="stable")
    bounds = np.flatnonzero(np.diff(group_codes[order])) + 1
    context_ids, text_ids, relevant, teachers = [], [], [], []
    for rows in np.split(order, bounds):
        if len(rows) == 0 or labels[rows].max() <= 0:
            continue  # no positive: nothing to contrast against
        tie = np.nan_to_num(teacher[rows], nan=0.0)
        anchor = rows[np.lexsort((-tie, -labels[rows]))[0]]
        others = rows[rows != anchor]
        if len(others) > config.group_size - 1:
            others = np.sort(rng.choice(others, size=config.group_size - 1, replace=False))
        members = np.r_[anchor, others]
        context_ids.append(context_codes[anchor])
        text_ids.append(text_codes[members])
        relevant.append(np.r_[True, labels[others] > 0])
        teachers.append(teacher[members])
    return _Groups(
        np.asarray(context_ids, dtype=np.int64), text_ids, relevant, teachers, list(contexts), list(texts)
    )


def _group_loss(
    query: torch.Tensor,
    products: torch.Tensor,
    batch: list[int],
    groups: _Groups,
    config: BiEncoderConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive, distillation) losses of one batch of groups (distillation: `config.distill_loss`).

    `query` holds one embedding per group, `products` every text of the batch, groups concatenated in
    batch order. Each context's target is its anchor among all the batch's products; the other relevant
    products of its own group are masked out (a graded query has several right answers).
    """
    device = query.device
    sizes = [len(groups.text_ids[g]) for g in batch]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    logits = query @ products.T / config.temperature  # [groups, products]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for row, (g, start) in enumerate(zip(batch, starts, strict=True)):
        also_relevant = np.flatnonzero(groups.relevant[g][1:]) + 1
        if len(also_relevant):
            mask[row, torch.as_tensor(start + also_relevant, device=device)] = True
    targets = torch.as_tensor(starts, dtype=torch.long, device=device)
    contrastive = functional.cross_entropy(logits.masked_fill(mask, float("-inf")), targets)

    student, teacher = [], []
    for row, (g, start) in enumerate(zip(batch, starts, strict=True)):
        scores = groups.teacher[g]
        if len(scores) < 2 or np.isnan(scores).any():
            continue
        student.append(logits[row, start : start + len(scores)])
        teacher.append(torch.as_tensor(config.teacher_scale * scores, dtype=torch.float32, device=device))
    if not student or config.distill_weight == 0:
        return contrastive, logits.new_zeros(())
    if config.distill_loss == "listwise":
        return contrastive, _listwise_kl(student, teacher)
    student_margins = torch.cat([own[0] - own[1:] for own in student])
    teacher_margins = torch.cat([own[0] - own[1:] for own in teacher])
    return contrastive, functional.mse_loss(student_margins, teacher_margins)


def _listwise_kl(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over groups of KL(softmax(teacher) || softmax(student)), each group its own list of logits.

    Groups differ in length, so they are padded to the longest with -inf (a padded slot has probability 0
    on both sides and adds nothing).
    """
    width = max(len(own) for own in student)
    padded_student = student[0].new_full((len(student), width), float("-inf"))
    padded_teacher = padded_student.new_full((len(teacher), width), float("-inf"))
    for row, (own, target) in enumerate(zip(student, teacher, strict=True)):
        padded_student[row, : len(own)] = own
        padded_teacher[row, : len(target)] = target
    log_student = functional.log_softmax(padded_student, dim=-1)
    log_teacher = functional.log_softmax(padded_teacher, dim=-1)
    real = torch.isfinite(padded_teacher)
    terms = torch.where(real, log_teacher.exp() * (log_teacher - log_student), torch.zeros_like(log_student))
    return terms.sum(dim=-1).mean()


def evaluate_dense(encoder: BiEncoder, frame: pd.DataFrame) -> dict[str, float]:
    """NDCG@10 of cosine scores over a pair frame's groups (gains: labels above the lowest label)."""
    scores = dense_pair_scores(encoder, frame["context"].tolist(), frame["text"].tolist())
    labels = frame["label"].to_numpy(dtype=np.float64)
    codes = pd.factorize(frame["group"])[0]
    return {f"valid_ndcg_at_{NDCG_K}": ndcg_at_k(codes, labels - labels.min(), scores)}


def dense_pair_scores(encoder: BiEncoder, contexts: list[str], texts: list[str]) -> np.ndarray:
    """The cosine of each (context, text) pair, each distinct string embedded once."""
    if len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts but {len(texts)} texts: they must pair up one to one")
    context_codes, unique_contexts = pd.factorize(pd.Series(contexts, dtype=object))
    text_codes, unique_texts = pd.factorize(pd.Series(texts, dtype=object))
    left = encoder.encode(list(unique_contexts))
    right = encoder.encode(list(unique_texts))
    return (left[context_codes] * right[text_codes]).sum(axis=1).astype(np.float32)


def finetune_bi_encoder(
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    base_model: str | Path,
    output_dir: str | Path,
    config: BiEncoderConfig,
) -> dict[str, Any]:
    """Fine-tune a bi-encoder from `base_model` on a pair frame; write the best checkpoint to `output_dir`.

    With a `teacher` column the margin-MSE distillation loss is added to the in-batch contrastive one.
    With `valid` (a pair frame: candidate lists as evaluation sees them), the model is evaluated after each
    epoch by NDCG@10 and the best epoch is kept. Returns what `biencoder.json` records.
    """
    check_pairs(train, "train", "mse")
    if valid is not None:
        check_pairs(valid, "valid", "mse")
    base_model, output_dir = Path(base_model), Path(output_dir)
    if not (base_model / "config.json").is_file():
        raise ConfigError(f"base model {base_model}: not a model folder (no config.json)")
    if TEACHER_COLUMN in train.columns and not np.isfinite(train[TEACHER_COLUMN].to_numpy(float)).all():
        raise ConfigError(f"the {TEACHER_COLUMN!r} column holds missing or infinite scores")
    device = resolve_device(config.device)
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    groups = _training_groups(train, config, rng)
    if len(groups.context_ids) == 0:
        raise ConfigError("no training group has a positive label: nothing to train the bi-encoder on")
    items = np.arange(len(groups.context_ids))
    if config.max_train_groups is not None and len(items) > config.max_train_groups:
        items = np.sort(rng.choice(items, size=config.max_train_groups, replace=False))

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModel.from_pretrained(base_model, dtype=torch.float32, add_pooling_layer=False)
    if config.max_length > model.config.max_position_embeddings:
        raise ConfigError(
            f"max_length {config.max_length} exceeds the {model.config.max_position_embeddings} positions "
            f"of {base_model}"
        )
    model.to(device).train()
    encoder = BiEncoder(model, tokenizer, config.max_length, autocast_dtype=autocast_dtype)
    context_tokens = encode_pairs(tokenizer, groups.contexts, None, config.max_length).to(device)
    text_tokens = encode_pairs(tokenizer, groups.texts, None, config.max_length).to(device)

    batches_per_epoch = math.ceil(len(items) / config.batch_size)
    total_steps = config.epochs * batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    undecayed = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            step / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        ),
    )
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    epochs: list[dict[str, Any]] = []
    best: float | None = None
    best_epoch, stale, step = None, 0, 0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        losses: list[torch.Tensor] = []
        order = rng.permutation(items)
        for first in range(0, len(order), config.batch_size):
            batch = [int(g) for g in order[first : first + config.batch_size]]
            context_index = torch.as_tensor(groups.context_ids[batch], device=device)
            text_index = torch.as_tensor(np.concatenate([groups.text_ids[g] for g in batch]), device=device)
            with autocast:
                query = encoder._pooled(
                    context_tokens,
                    context_index,
                    int(context_tokens.lengths[groups.context_ids[batch]].max()),
                )
                products = encoder._pooled(
                    text_tokens, text_index, int(text_tokens.lengths[text_index.cpu().numpy()].max())
                )
            contrastive, distill = _group_loss(query.float(), products.float(), batch, groups, config)
            loss = contrastive + config.distill_weight * distill
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(torch.stack([loss.detach(), contrastive.detach(), distill.detach()]))
            step += 1
            if step >= total_steps:
                break
        means = torch.stack(losses).mean(dim=0).tolist() if losses else [float("nan")] * 3
        record: dict[str, Any] = {
            "epoch": epoch,
            "steps": step,
            "train_loss": means[0],
            "train_contrastive": means[1],
            "train_distill": means[2],
            "train_seconds": time.perf_counter() - epoch_start,
        }
        if valid is not None and len(valid):
            record |= evaluate_dense(encoder, valid)
            score = record[f"valid_ndcg_at_{NDCG_K}"]
            score = score if math.isfinite(score) else float("-inf")
            if best is None or score > best:
                best, best_epoch, stale = score, epoch, 0
                encoder.save(output_dir)
            else:
                stale += 1
        epochs.append(record)
        if step >= total_steps or stale >= config.early_stopping_patience:
            break
    if valid is None or not len(valid):
        encoder.save(output_dir)
    chosen = next((e for e in epochs if e["epoch"] == best_epoch), epochs[-1])
    import transformers

    summary = {
        "fusionrank_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "base_model": str(base_model),
        "settings": asdict(config),
        "device": str(device),
        "bf16": use_bf16,
        "train_groups": len(items),
        "distilled": bool(TEACHER_COLUMN in train.columns and config.distill_weight > 0),
        "steps": step,
        "seconds": time.perf_counter() - started,
        "best_epoch": best_epoch,
        **{k: v for k, v in chosen.items() if k.startswith("valid_")},
        "train_loss": epochs[-1]["train_loss"],
        "epochs": epochs,
    }
    (output_dir / BIENCODER_JSON).write_text(json.dumps(summary, indent=2))
    return summary
