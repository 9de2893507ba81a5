"""The ranker bundle: every fitted part of one model version, and the one path from a request to a ranking.

The pipeline builds its evaluation frames with `signal_frame`, the champion comparison and the server call
`Ranker.frame` and `Ranker.rank`, and all of them score with `fusion.score_candidates`: training,
evaluation and serving cannot drift apart.

Bundle layout (a folder; the registry stores it as one artifact, the BentoML model store as one model):
    manifest.json      mode, signal names, fusion kind, feature service, data hash, metrics
    products.parquet   product_id, title (catalog for texts and retrieval)
    signals/<name>/    each traditional signal, saved by the signal itself
    bert/              the fine-tuned cross-encoder (safetensors + tokenizer)
    fusion/<kind>/     each fitted fusion model
    reference.parquet  the validation frame it was fitted on: the drift reference for the next run
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrank.context import Context, RankingExample
from fusionrank.errors import DataError
from fusionrank.signals.base import read_meta

SIGNAL_PREFIX = "s_"
FEATURE_PREFIX = "f_"
MANIFEST = "manifest.json"

FeatureReader = Callable[[Sequence[RankingExample]], pd.DataFrame]


def signal_frame(
    examples: Sequence[RankingExample],
    signals: Mapping[str, object],
    features: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The candidate frame of `examples`: one row per (qid, product_id) with gain and `s_<signal>` columns.

    `features`, when given, holds `qid`, `product_id` and `f_<name>` columns, joined on both keys; rows
    without features keep NaN, which the fusion treats as missing.
    """
    qids = np.repeat([e.qid for e in examples], [len(e.candidates) for e in examples])
    products = [pid for e in examples for pid in e.candidates]
    gains = [e.gains.get(pid, 0.0) for e in examples for pid in e.candidates]
    frame = pd.DataFrame({"qid": qids.astype(str), "product_id": products, "gain": gains})
    contexts = [e.context for e in examples]
    candidate_lists = [e.candidates for e in examples]
    for name, signal in signals.items():
        scores = signal.score_batch(contexts, candidate_lists)
        frame[f"{SIGNAL_PREFIX}{name}"] = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if features is not None and len(features):
        if _same_rows(frame, features):
            # the server's case: the features were looked up in candidate order, so no join is needed
            # (pandas' merge on two keys cost about a millisecond a request)
            extra = features.drop(columns=["qid", "product_id"]).reset_index(drop=True)
            frame = pd.concat([frame, extra], axis=1)
        else:
            frame = frame.merge(features, on=["qid", "product_id"], how="left", validate="many_to_one")
    return frame


def _same_rows(frame: pd.DataFrame, features: pd.DataFrame) -> bool:
    """Whether `features` has one row per row of `frame`, with the same qid and product id, in order."""
    if len(features) != len(frame) or features.columns.duplicated().any():
        return False
    if set(features.columns) & set(frame.columns) != {"qid", "product_id"}:
        return False  # a clash the join would suffix
    return all(
        np.array_equal(frame[key].to_numpy(dtype=object), features[key].astype(str).to_numpy(dtype=object))
        for key in ("qid", "product_id")
    )


def contexts_frame(examples: Sequence[RankingExample]) -> pd.DataFrame:
    """One row per request: qid, query, user_id and history, so a later step can rebuild each `Context`."""
    return pd.DataFrame(
        {
            "qid": [e.qid for e in examples],
            "query": [e.context.query for e in examples],
            "user_id": [e.context.user_id for e in examples],
            "history": [list(e.context.history) for e in examples],
        }
    )


def qrels_frame(examples: Sequence[RankingExample]) -> pd.DataFrame:
    """Every judged product of every request (qid, product_id, gain), retrieved or not, so recall counts
    the judged products a candidate generator missed."""
    return pd.DataFrame(
        [(e.qid, pid, float(g)) for e in examples for pid, g in e.gains.items()],
        columns=["qid", "product_id", "gain"],
    )


def examples_from_frames(
    frame: pd.DataFrame, contexts: pd.DataFrame, qrels: pd.DataFrame | None = None
) -> list[RankingExample]:
    """Rebuild the `RankingExample`s a candidate frame was made from (candidates in frame order).

    Gains come from `qrels` when given (judged products the candidates missed included), else from the frame.
    """
    by_qid = {
        str(row.qid): Context(
            query=None if pd.isna(row.query) else str(row.query),
            user_id=None if pd.isna(row.user_id) else str(row.user_id),
            history=tuple(str(p) for p in row.history),
        )
        for row in contexts.itertuples(index=False)
    }
    judged: dict[str, dict[str, float]] = {}
    if qrels is not None:
        for qid, pid, gain in zip(
            qrels["qid"].astype(str), qrels["product_id"].astype(str), qrels["gain"], strict=True
        ):
            judged.setdefault(qid, {})[pid] = float(gain)
    examples = []
    for qid, rows in frame.groupby("qid", sort=False):
        if qid not in by_qid:
            raise DataError(f"candidate frame names request {qid!r} that the contexts table lacks")
        if qrels is not None:
            gains = judged.get(qid, {})
        else:
            gains = {p: float(g) for p, g in zip(rows["product_id"], rows["gain"], strict=True) if g > 0}
        examples.append(RankingExample(context=by_qid[qid], candidates=list(rows["product_id"]), gains=gains))
    return examples


@dataclass
class Ranker:
    """A loaded bundle: signals, optional cross-encoder, fusion models and the catalog."""

    directory: Path
    manifest: dict
    signals: dict[str, object]
    fusions: dict[str, object]
    titles: dict[str, str]
    bert: object | None = None
    extra_signals: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path, load_bert: bool = True, int8: bool | None = None) -> Ranker:
        """Load every part of the bundle in `directory`.

        `int8` applies int8 dynamic quantization to the CPU inference of the cross-encoder and of the dense
        signal's context encoder; None follows the bundle's serving config (`serving.int8`). It changes
        nothing on a GPU.
        """
        from fusionrank.fusion import FusionModel
        from fusionrank.signals.base import load_signal
        from fusionrank.signals.dense import KIND as DENSE_KIND
        from fusionrank.signals.dense import DenseSignal

        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise DataError(f"{directory}: not a ranker bundle (no {MANIFEST})")
        manifest = json.loads(path.read_text())
        if int8 is None:
            int8 = bool((manifest.get("serving") or {}).get("int8", False))
        signals = {}
        for name in manifest["signals"]:
            folder = directory / "signals" / name
            if read_meta(folder).get("kind") == DENSE_KIND:
                signals[name] = DenseSignal.load(folder, int8=int8)
            else:
                signals[name] = load_signal(folder)
        fusions = {kind: FusionModel.load(directory / "fusion" / kind) for kind in manifest["fusions"]}
        products = pd.read_parquet(directory / "products.parquet")
        titles = dict(zip(products["product_id"].astype(str), products["title"].astype(str), strict=True))
        bert = None
        if load_bert and (directory / "bert").is_dir():
            from fusionrank.bert import CrossEncoder

            bert = CrossEncoder.load(directory / "bert")
            if int8 and bert.device.type == "cpu":
                bert = bert.int8()
        return cls(directory, manifest, signals, fusions, titles, bert)

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def selected(self) -> str:
        return self.manifest["selected_fusion"]

    def frame(
        self,
        examples: Sequence[RankingExample],
        features: pd.DataFrame | None = None,
        shortlist: bool = True,
        rerank_k: int | None = None,
    ) -> pd.DataFrame:
        """The candidate frame for `examples` with every signal of this bundle, BERT included.

        The cross-encoder scores only the rows its fusion will read (none when a weighted fusion gives it no
        weight, unless `shortlist=False`): under a cascade fusion the cascade's
        shortlist, and with `rerank_k` each request's top `rerank_k` by the fusion without it
        (`fusion.score_with_rerank`, which `score` applies with the same `rerank_k`). Other rows' `s_bert`
        stays NaN. `shortlist=False` scores every candidate. The server and the champion comparison both
        build their frames here.
        """
        from fusionrank.fusion import cascade_shortlist, reads_rerank_signal, rerank_shortlist

        frame = signal_frame(examples, self.signals, features)
        if self.bert is None:
            return frame
        fusion = self.fusions[self.selected]
        if not shortlist:
            picked = frame.index
        elif not reads_rerank_signal(fusion):
            # the selected fusion gives the cross-encoder no weight: its scores would change nothing
            picked = frame.index[:0]
        elif getattr(fusion, "kind", None) == "cascade":
            picked = cascade_shortlist(fusion, frame).index
        elif rerank_k is not None and "s_bert" in fusion.signals:
            picked = rerank_shortlist(fusion, frame, rerank_k)
        else:
            picked = frame.index
        frame["s_bert"] = np.nan
        if len(picked):
            rows = frame.loc[picked]
            keep = rows.groupby("qid", sort=False)["product_id"].agg(list).to_dict()
            short = [RankingExample(e.context, keep[e.qid]) for e in examples if keep.get(e.qid)]
            # bert_scores follows `short` (requests in order, each one's rows in frame order)
            order = rows.assign(_q=rows["qid"].map({e.qid: i for i, e in enumerate(examples)}))
            order = order.sort_values("_q", kind="stable").index
            frame.loc[order, "s_bert"] = bert_scores(self.bert, short, self.titles)
        return frame

    def score(
        self,
        frame: pd.DataFrame,
        fusion: str | None = None,
        rerank_k: int | None = None,
        explain_top: int | None = None,
    ) -> pd.DataFrame:
        """Fused scores and per-signal contributions of a candidate frame (the one scoring function), with
        the cross-encoder's budget `rerank_k` as in `frame`; `explain_top`: see `fusion.score_candidates`."""
        from fusionrank.fusion import score_with_rerank

        return score_with_rerank(self.fusions[fusion or self.selected], frame, rerank_k, explain_top)


def bert_scores(bert, examples: Sequence[RankingExample], titles: Mapping[str, str]) -> np.ndarray:
    """Cross-encoder scores of every (context, candidate) pair of `examples`, in frame order."""
    from fusionrank.text import context_text, product_text

    contexts, texts = [], []
    for example in examples:
        text = context_text(example.context, titles)
        for pid in example.candidates:
            contexts.append(text)
            texts.append(product_text(titles.get(pid, "")))
    if not contexts:
        return np.zeros(0, dtype=np.float32)
    if getattr(bert, "quantized", False):
        # int8 dynamic quantization scales activations per batch: each request's pairs in their own
        # passes, so its scores do not depend on the requests batched with it
        sizes = np.cumsum([0, *(len(e.candidates) for e in examples)])
        parts = [bert.score(contexts[a:b], texts[a:b]) for a, b in pairwise(sizes)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return bert.score(contexts, texts)


def write_bundle(
    directory: str | Path,
    manifest: dict,
    products: pd.DataFrame,
    signals_dir: str | Path,
    fusion_dir: str | Path,
    bert_dir: str | Path | None,
    reference: pd.DataFrame,
) -> Path:
    """Assemble a bundle folder from the pipeline's artifacts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(signals_dir, directory / "signals", dirs_exist_ok=True)
    shutil.copytree(fusion_dir, directory / "fusion", dirs_exist_ok=True)
    if bert_dir is not None:
        shutil.copytree(bert_dir, directory / "bert", dirs_exist_ok=True)
    products[["product_id", "title"]].to_parquet(directory / "products.parquet", index=False)
    reference.to_parquet(directory / "reference.parquet", index=False)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return directory
