"""Fusion of ranking signals: weighted, cascade and LambdaMART, and THE one function that scores candidates.

Every step works on a candidate frame: one row per (qid, product_id), rows of one qid contiguous, a float
`gain` (0 for non-relevant or unjudged) and raw signal columns (`s_<name>`) and feature columns
(`f_<name>`). Fitting uses the validation split's frame, which the cross-encoder never trained on.

`score_candidates` is the only way a fitted fusion turns a frame into a ranking; evaluation and the server
both call it. It returns, beside the fused `score`, one contribution column per signal whose sum is the
score: `c_<name>` for `s_<name>`, `c_<column>` for any other column (e.g. `c_f_pop_7d`), and `c_bias` for
the part no signal explains (LightGBM's bias term, the cascade's tier offset).

A fitted fusion saves itself as JSON plus, for LambdaMART, LightGBM's own text model: no pickle.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from fusionrank.errors import ConfigError, DataError
from fusionrank.treeshap import TreeShapTables

if TYPE_CHECKING:
    import lightgbm

FusionKind = Literal["weighted", "cascade", "lambdamart"]
KINDS: tuple[str, ...] = ("weighted", "cascade", "lambdamart")
NORMALIZATIONS: tuple[str, ...] = ("minmax", "zscore", "rank")
SIGNAL_PREFIX = "s_"
BIAS_COLUMN = "c_bias"
MODEL_FILE = "fusion.json"
BOOSTER_FILE = "lambdamart.txt"
FIRST_STAGE_DIR = "first_stage"
FORMAT_VERSION = 1
FIT_METRIC = "ndcg@10"
# Relative weights a coordinate step may give one signal while the others keep theirs. Ranking is invariant
# to scaling all weights, so a grid of ratios around the current weights covers the useful range.
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
# Distinct gain levels LambdaMART accepts; more means a continuous gain that should be graded first.
MAX_LABEL_LEVELS = 256
LAMBDAMART_DEFAULTS: dict[str, Any] = {
    "objective": "lambdarank",
    "n_estimators": 500,
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
EARLY_STOPPING_ROUNDS = 50


@dataclass
class FusionModel:
    """A fitted fusion: which columns it reads and the parameters of its kind.

    weighted: per-query `normalization` of each signal, then the sum of `weights[signal] * normalized`.
    cascade: `first_stage` ranks every candidate; its top `k` per query are re-ranked by `rerank_signal`
    alone and placed above the rest, which keep the first stage's order.
    lambdamart: a LightGBM lambdarank `booster` over `signals` (missing values handled by the trees).
    """

    kind: FusionKind
    signals: list[str]
    normalization: str = "minmax"
    weights: dict[str, float] = field(default_factory=dict)
    first_stage: FusionModel | None = None
    rerank_signal: str | None = None
    k: int | None = None
    booster: lightgbm.Booster | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)
    # Threads of LightGBM's predictions (scores, and TreeSHAP where the tables cannot hold the model); 0:
    # OpenMP's default. Not saved: the cores a process may use belong to where it runs (`use_threads`).
    threads: int = field(default=0, compare=False)
    # the booster's TreeSHAP tables once built; False where they cannot describe it (`_shap_tables`)
    _shap: TreeShapTables | bool | None = field(default=None, init=False, repr=False, compare=False)

    def use_threads(self, threads: int) -> None:
        """Predict with `threads` LightGBM threads, here and in a cascade's first stage. A row's score and
        contributions do not depend on the thread count."""
        if threads < 0:
            raise ConfigError(f"prediction threads must not be negative, got {threads}")
        self.threads = threads
        if self.first_stage is not None:
            self.first_stage.use_threads(threads)

    def save(self, directory: str | Path) -> None:
        """Write the model under `directory`: fusion.json, plus LightGBM's text model or the first stage."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "signals": list(self.signals),
            "normalization": self.normalization,
            "weights": dict(self.weights),
            "rerank_signal": self.rerank_signal,
            "k": self.k,
            "fit_info": self.fit_info,
        }
        if self.kind == "lambdamart":
            if self.booster is None:
                raise DataError("a lambdamart fusion without a booster cannot be saved")
            self.booster.save_model(str(directory / BOOSTER_FILE))
        if self.kind == "cascade":
            if self.first_stage is None:
                raise DataError("a cascade fusion without a first stage cannot be saved")
            self.first_stage.save(directory / FIRST_STAGE_DIR)
        (directory / MODEL_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True, default=_json_default))

    @classmethod
    def load(cls, directory: str | Path) -> FusionModel:
        """Read a model written by `save`; DataError naming the file when it is missing or malformed."""
        directory = Path(directory)
        path = directory / MODEL_FILE
        if not path.is_file():
            raise DataError(f"{directory}: not a saved fusion model (no {MODEL_FILE})")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if spec.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: fusion format version {spec.get('format_version')!r}; "
                f"this code reads version {FORMAT_VERSION}"
            )
        kind = spec.get("kind")
        if kind not in KINDS:
            raise DataError(f"{path}: unknown fusion kind {kind!r}; known kinds: {', '.join(KINDS)}")
        booster = None
        first_stage = None
        if kind == "lambdamart":
            import lightgbm

            booster_path = directory / BOOSTER_FILE
            if not booster_path.is_file():
                raise DataError(f"{directory}: lambdamart fusion lacks its LightGBM model {BOOSTER_FILE}")
            try:
                booster = lightgbm.Booster(model_file=str(booster_path))
            except lightgbm.basic.LightGBMError as exc:
                raise DataError(f"{booster_path}: not a LightGBM text model ({exc})") from exc
        if kind == "cascade":
            first_stage = cls.load(directory / FIRST_STAGE_DIR)
        return cls(
            kind=kind,
            signals=list(spec["signals"]),
            normalization=spec.get("normalization", "minmax"),
            weights={str(s): float(w) for s, w in spec.get("weights", {}).items()},
            first_stage=first_stage,
            rerank_signal=spec.get("rerank_signal"),
            k=spec.get("k"),
            booster=booster,
            fit_info=spec.get("fit_info", {}),
        )


def tie_keys(qid: Sequence[str] | pd.Series, product_id: Sequence[str] | pd.Series) -> np.ndarray:
    """The order of equal scores: a fixed hash of (request, product), lowest first.

    The evaluation harness orders ties the same way, so a served ranking and its evaluated figures agree,
    and neither the candidate order nor where a held-out item was placed can favour a ranker.
    """
    return np.fromiter(
        (zlib.crc32(f"{q}\x1f{p}".encode()) for q, p in zip(qid, product_id, strict=True)),
        dtype=np.int64,
        count=len(qid),
    )


def contribution_column(column: str) -> str:
    """The contribution column of a frame column: `s_bm25` -> `c_bm25`, `f_pop_7d` -> `c_f_pop_7d`."""
    name = column.removeprefix(SIGNAL_PREFIX)
    return f"c_{name}"


def fit_weighted(
    frame: pd.DataFrame,
    signals: Sequence[str],
    normalization: str = "minmax",
    metric: str = FIT_METRIC,
    max_rounds: int = 4,
) -> FusionModel:
    """Per-query normalisation plus non-negative weights tuned on `frame` to maximise `metric` (ranx).

    Coordinate ascent over a grid of relative weights, started from the best single signal, so the fused
    ranking scores at least as well as every single signal on `frame`. A missing value contributes 0.
    """
    signals = _check_signals(signals)
    if normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
        )
    _check_frame(frame, signals, need_gain=True)
    objective = _Objective(frame, metric)
    codes = _query_codes(frame)
    matrix = _normalize(_signal_matrix(frame, signals), codes, normalization)
    singles = {s: objective(matrix[:, j]) for j, s in enumerate(signals)}
    best_signal = max(signals, key=lambda s: singles[s])
    weights = np.array([1.0 if s == best_signal else 0.0 for s in signals])
    best = singles[best_signal]
    # a column constant inside every query cannot change any ranking: it keeps weight 0 unsearched
    spread = _group_reduce(np.fmax, matrix, codes, -np.inf) - _group_reduce(np.fmin, matrix, codes, np.inf)
    searched = [j for j in range(len(signals)) if (spread[:, j] > 0).any()]
    for _ in range(max_rounds):
        improved = False
        for j in searched:
            current = weights[j]
            for value in WEIGHT_GRID:
                if value == current:
                    continue
                trial = weights.copy()
                trial[j] = value
                if trial.sum() <= 0:
                    continue
                score = objective(matrix @ trial)
                # a strict margin keeps the search from wandering along plateaus of equal rankings
                if score > best + 1e-9:
                    best, weights, improved = score, trial, True
        if not improved:
            break
    weights = weights / weights.sum()
    return FusionModel(
        kind="weighted",
        signals=list(signals),
        normalization=normalization,
        weights={s: float(w) for s, w in zip(signals, weights, strict=True)},
        fit_info={
            "metric": metric,
            "fit_score": float(best),
            "single_signal_scores": {s: float(v) for s, v in singles.items()},
            "n_queries": objective.n_queries,
        },
    )


def fit_cascade(
    frame: pd.DataFrame,
    first_stage: FusionModel | Sequence[str],
    rerank_signal: str = "s_bert",
    k: int = 20,
    metric: str = FIT_METRIC,
) -> FusionModel:
    """A cheap first stage keeps each query's top `k`; `rerank_signal` alone re-orders those `k`.

    `first_stage` is a fitted fusion, or the columns of a weighted fusion fitted here on `frame`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"cascade k must be a positive integer, got {k!r}")
    if not isinstance(first_stage, FusionModel):
        columns = [c for c in _check_signals(first_stage) if c != rerank_signal]
        if not columns:
            raise ConfigError(f"the cascade's first stage needs a signal other than {rerank_signal!r}")
        first_stage = fit_weighted(frame, columns, metric=metric)
    _check_frame(frame, [*first_stage.signals, rerank_signal], need_gain=True)
    model = FusionModel(
        kind="cascade",
        signals=_unique([*first_stage.signals, rerank_signal]),
        first_stage=first_stage,
        rerank_signal=rerank_signal,
        k=k,
    )
    objective = _Objective(frame, metric)
    model.fit_info = {
        "metric": metric,
        "fit_score": float(objective(*_fused_score(model, frame))),
        "n_queries": objective.n_queries,
    }
    return model


def fit_lambdamart(
    frame: pd.DataFrame,
    signals: Sequence[str],
    params: dict[str, Any] | None = None,
    valid_frac: float = 0.2,
    seed: int = 0,
) -> FusionModel:
    """LightGBM LambdaMART (`LGBMRanker`, objective lambdarank) grouped by qid.

    Early stopping on NDCG@10 of a holdout of `valid_frac` of the frame's queries (chosen with `seed`).
    Gains become integer labels whose LightGBM `label_gain` is the gain itself, so LightGBM optimises the
    same linear-gain NDCG that ranx reports. `params` override LAMBDAMART_DEFAULTS.

    Each query's rows are put in `tie_keys` order first, so the fit does not depend on the order of the
    candidates. LightGBM's NDCG ranks tied scores in row order: a frame listing the held-out item first
    (as recommendation frames do) made the first trees, whose few leaves tie most rows, look best on the
    holdout, and early stopping kept them (on 12,000 Games validation requests, 1 tree and test NDCG@10
    0.745 against 58 trees and 0.774 once the rows were reordered).
    """
    import lightgbm

    signals = _check_signals(signals)
    _check_frame(frame, signals, need_gain=True)
    if not 0.0 <= valid_frac < 1.0:
        raise ConfigError(f"valid_frac must be in [0, 1), got {valid_frac!r}")
    codes = pd.factorize(frame["qid"].to_numpy())[0]
    order = np.lexsort((tie_keys(frame["qid"], frame["product_id"]), codes))
    frame = frame.iloc[order].reset_index(drop=True)
    labels, label_gain = _graded_labels(frame["gain"].to_numpy(dtype=float))
    qids = pd.unique(frame["qid"])
    n_holdout = round(valid_frac * len(qids)) if len(qids) >= 2 else 0
    rng = np.random.default_rng(seed)
    holdout = set(rng.choice(qids, size=n_holdout, replace=False)) if n_holdout else set()
    in_holdout = frame["qid"].isin(holdout).to_numpy()
    settings = {**LAMBDAMART_DEFAULTS, "random_state": seed, "label_gain": label_gain, **(params or {})}
    ranker = lightgbm.LGBMRanker(**settings)
    features = frame[signals].astype(float)
    train = ~in_holdout
    fit_args: dict[str, Any] = {}
    if in_holdout.any():
        fit_args = {
            "eval_X": (features[in_holdout],),
            "eval_y": (labels[in_holdout],),
            "eval_group": [_group_sizes(frame["qid"][in_holdout])],
            "eval_at": [10],
            "callbacks": [
                lightgbm.early_stopping(EARLY_STOPPING_ROUNDS, first_metric_only=True, verbose=False)
            ],
        }
    ranker.fit(features[train], labels[train], group=_group_sizes(frame["qid"][train]), **fit_args)
    best_iteration = int(ranker.best_iteration_ or ranker.n_estimators)
    # the in-memory booster is rebuilt from the text it saves, so a loaded model scores identically
    booster = lightgbm.Booster(model_str=ranker.booster_.model_to_string(num_iteration=best_iteration))
    model = FusionModel(
        kind="lambdamart",
        signals=list(signals),
        booster=booster,
        fit_info={"best_iteration": best_iteration, "n_queries": len(qids), "holdout_queries": n_holdout},
    )
    objective = _Objective(frame, FIT_METRIC)
    model.fit_info["fit_score"] = float(objective(_fused_score(model, frame)[0]))
    if in_holdout.any() and frame["gain"][in_holdout].gt(0).any():
        part = frame[in_holdout]
        model.fit_info["holdout_score"] = float(_Objective(part, FIT_METRIC)(_fused_score(model, part)[0]))
    model.fit_info["metric"] = FIT_METRIC
    return model


def fit_all(
    valid_frame: pd.DataFrame, signals: Sequence[str], cascade_k: int = 20, seed: int = 0
) -> dict[str, FusionModel]:
    """Fit every strategy on the validation frame: weighted and LambdaMART over `signals`, and the cascade
    (first stage: weighted over every column but `s_bert`; re-ranker: `s_bert`) when `s_bert` is among them.
    """
    signals = _check_signals(signals)
    models = {"weighted": fit_weighted(valid_frame, signals)}
    if "s_bert" in signals and len(signals) > 1:
        models["cascade"] = fit_cascade(valid_frame, signals, rerank_signal="s_bert", k=cascade_k)
    models["lambdamart"] = fit_lambdamart(valid_frame, signals, seed=seed)
    return models


def weights_summary(model: FusionModel) -> str:
    """A one-line description of a fitted fusion, for logs and reports."""
    if model.kind == "weighted":
        parts = ", ".join(f"{s}={w:.2f}" for s, w in model.weights.items() if not math.isclose(w, 0.0))
        return f"weighted ({model.normalization}): {parts}"
    if model.kind == "cascade" and model.first_stage is not None:
        first = weights_summary(model.first_stage)
        return f"cascade k={model.k}, re-ranker {model.rerank_signal}; first stage {first}"
    return f"lambdamart over {len(model.signals)} columns, {model.fit_info.get('best_iteration')} trees"


def score_candidates(model: FusionModel, frame: pd.DataFrame, explain_top: int | None = None) -> pd.DataFrame:
    """THE scoring function: `frame`'s rows with the fused `score`, one `c_*` contribution column per signal
    (they sum to `score`) and `rank` (1 = best), sorted by qid, then score descending (ties: `tie_keys`).

    A signal column absent from `frame` (e.g. the online store is down) counts as missing values, not an
    error; the result names the columns that are absent or hold no value at all in
    `result.attrs["missing_signals"]`.

    `explain_top=n` computes a LambdaMART fusion's contributions (TreeSHAP: for the Home Depot model's 90
    trees, 20 microseconds a row from `fusionrank.treeshap`'s tables and 280 in LightGBM's own, against 1.5
    for its score) for each query's top `n` rows only, the rows a server returns; the others' `c_*` are NaN.
    Scores and ranks are the same either way. Other kinds always give every row's contributions (they cost
    no more than the score).
    """
    _check_frame(frame, [], need_gain=False)
    present = [c for c in model.signals if c in frame.columns]
    empty = frame[present].isna().all() & (len(frame) > 0)
    missing = [c for c in model.signals if c not in frame.columns or empty[c]]
    if model.kind == "lambdamart":
        # the booster's own score, not the sum of its contributions: that sum differs from it by float
        # rounding, which would order the rows of equal score (the same leaves) by rounding noise
        names = [*(contribution_column(s) for s in model.signals), BIAS_COLUMN]
        score, tiebreak = _lambdamart_scores(model, frame), np.zeros(len(frame))
        values = None if explain_top is not None else _lambdamart_contributions(model, frame)
    else:
        names, values, tiebreak = _fused(model, frame)
        score = values.sum(axis=1)
    codes = pd.factorize(frame["qid"].to_numpy(), sort=True)[0]
    order = np.lexsort((tie_keys(frame["qid"], frame["product_id"]), -tiebreak, -score, codes))
    rank = _slots(codes[order]) + 1
    if values is None:  # contributions of the top `explain_top` rows of each query only
        values = np.full((len(frame), len(names)), np.nan)
        rows = order[rank <= int(explain_top or 0)]
        if len(rows):
            values[rows] = _lambdamart_contributions(model, frame.iloc[rows])
    added = pd.DataFrame(values[order], columns=names)
    added["score"] = score[order]
    added["rank"] = rank
    base = frame.iloc[order].reset_index(drop=True)
    clash = [c for c in added.columns if c in base.columns]
    scored = pd.concat([base.drop(columns=clash) if clash else base, added], axis=1)
    scored.attrs["missing_signals"] = missing
    return scored


RERANK_COLUMN = "s_bert"


def reads_rerank_signal(model: FusionModel) -> bool:
    """Whether the fusion's scores depend on the cross-encoder's: not for a weighted fusion that gives it
    no weight (its rows would be scored by a model whose score counts for nothing)."""
    if RERANK_COLUMN not in model.signals:
        return False
    return model.kind != "weighted" or bool(model.weights.get(RERANK_COLUMN, 0.0))


def rerank_shortlist(model: FusionModel, frame: pd.DataFrame, rerank_k: int) -> pd.Index:
    """The index labels of the rows whose cross-encoder score a budgeted ranker computes: each query's top
    `rerank_k` by the fusion with that score missing (the same model; a missing value contributes 0).
    No rows for a budget of 0 or less, found without scoring any row."""
    if rerank_k <= 0:
        return frame.index[:0]
    first = score_candidates(
        model, frame.assign(**{RERANK_COLUMN: np.nan}, _label=frame.index), explain_top=0
    )
    return pd.Index(first.loc[first["rank"] <= rerank_k, "_label"])


def score_with_rerank(
    model: FusionModel, frame: pd.DataFrame, rerank_k: int | None, explain_top: int | None = None
) -> pd.DataFrame:
    """`score_candidates` when the cross-encoder scores only each query's top `rerank_k` candidates.

    The fusion ranks every candidate without the cross-encoder's score; its top `rerank_k` are then ranked
    by the full fusion, their cross-encoder score included, above the rest, which keep the first order (a
    two-stage cascade over the selected fusion; the re-ranked tier is lifted above the rest by a per-query
    offset in `c_bias`, so scores descend with rank and contributions still sum to the score).
    `rerank_k=None`, a fusion that does not read the score (`reads_rerank_signal`) or is a cascade itself
    (it has its own shortlist) score every row as `score_candidates` does; 0 never calls the cross-encoder.
    `explain_top` is `score_candidates`'s: contributions of each query's final top `explain_top` only.
    """
    if rerank_k is None or not reads_rerank_signal(model) or model.kind == "cascade":
        return score_candidates(model, frame, explain_top)
    if rerank_k <= 0:
        return score_candidates(model, frame.assign(**{RERANK_COLUMN: np.nan}), explain_top)
    picked = rerank_shortlist(model, frame, rerank_k)
    if len(picked) == len(frame):
        return score_candidates(model, frame, explain_top)
    lazy = explain_top is not None and model.kind == "lambdamart"
    # One scoring of every row: the other signals keep the per-query normalisation they were fitted with
    # (over all candidates), the cross-encoder's score counts on the shortlist only (missing elsewhere,
    # so the other rows keep their first-stage score).
    in_head = frame.index.isin(picked)
    masked = frame.assign(**{RERANK_COLUMN: frame[RERANK_COLUMN].where(in_head)}, _head=in_head)
    scored = score_candidates(model, masked, 0 if lazy else None)
    head = scored[scored["_head"]].drop(columns="_head").reset_index(drop=True)
    first = scored[~scored["_head"]].drop(columns="_head").reset_index(drop=True)
    # each query's re-ranked tier sits above its other candidates, as in a cascade: a per-query offset in
    # the bias contribution (so that contributions still sum to the score and scores still descend)
    floor = head.groupby("qid")["score"].min()
    ceiling = first.groupby("qid")["score"].max()
    offset = (ceiling.reindex(floor.index) - floor + 1.0).clip(lower=0.0).fillna(0.0)
    lift = head["qid"].map(offset).to_numpy(dtype=float)
    head["score"] = head["score"].to_numpy(dtype=float) + lift
    head[BIAS_COLUMN] = head.get(BIAS_COLUMN, 0.0) + lift
    if BIAS_COLUMN not in first:
        first[BIAS_COLUMN] = 0.0
    head["_stage"], first["_stage"] = 0, 1
    head["_lift"], first["_lift"] = lift, 0.0
    merged = pd.concat([head, first], ignore_index=True)
    merged = merged.sort_values(["qid", "_stage", "rank"], kind="stable").reset_index(drop=True)
    merged["rank"] = merged.groupby("qid", sort=False).cumcount() + 1
    if lazy:  # the final top rows' contributions, from the inputs they were scored with, lift included
        rows = np.flatnonzero(merged["rank"].to_numpy() <= int(explain_top or 0))
        if len(rows):
            names = [*(contribution_column(c) for c in model.signals), BIAS_COLUMN]
            values = _lambdamart_contributions(model, merged.iloc[rows])
            values[:, -1] += merged["_lift"].to_numpy(dtype=float)[rows]
            merged.loc[rows, names] = values
    merged = merged.drop(columns=["_stage", "_lift"])
    merged.attrs["missing_signals"] = scored.attrs.get("missing_signals", [])
    return merged


def cascade_shortlist(model: FusionModel, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a cascade's re-ranker must score: each query's top `k` by the first stage, in frame order.

    The server calls this first so the expensive re-ranker sees only `k` candidates per request.
    """
    if model.kind != "cascade" or model.first_stage is None or model.k is None:
        raise ConfigError(f"cascade_shortlist needs a cascade fusion, got {model.kind!r}")
    _check_frame(frame, [], need_gain=False)
    first = _contributions(model.first_stage, frame, _query_codes(frame))[1].sum(axis=1)
    return frame[_within_query_position(frame, first) < model.k]


def ranking_metrics(
    frame: pd.DataFrame, scores: np.ndarray | str, metrics: Sequence[str], per_query: bool = False
) -> dict[str, float] | pd.DataFrame:
    """ranx metrics (e.g. "ndcg@10", "recall@20", "mrr") of ranking each query's rows by `scores`.

    `scores` is an array in frame order or the name of a column; ties follow `tie_keys`, NaN ranks last.
    Returns the means, or with `per_query` a frame indexed by qid (sorted) with one column per metric.
    Only queries with a positive gain in the frame count (ranx likewise skips queries absent from the
    qrels); a relevant product that is not among a query's candidates is invisible here, so figures that
    must count such misses come from the evaluation harness, which knows every judged product.
    """
    values = frame[scores].to_numpy(dtype=float) if isinstance(scores, str) else np.asarray(scores, float)
    if len(values) != len(frame):
        raise DataError(f"{len(values)} scores for a frame of {len(frame)} rows")
    objective = _Objective(frame, list(metrics))
    result = objective.evaluate(values, per_query=per_query)
    if per_query:
        return pd.DataFrame(result, index=pd.Index(objective.qids, name="qid"))
    return result


def best_single_signal(frame: pd.DataFrame, signals: Sequence[str], metric: str = "ndcg@10") -> str:
    """The signal column of `frame` with the best `metric` when it ranks alone (the baseline to beat)."""
    scores = {c: ranking_metrics(frame, c, [metric])[metric] for c in signals if c in frame.columns}
    if not scores:
        raise DataError(f"none of the signals {list(signals)} is in the frame that chooses the baseline")
    return max(scores, key=lambda c: scores[c])


def _fused(model: FusionModel, frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Contribution names and values (rows x columns) and the tie-break of equal scores, in frame order."""
    codes = _query_codes(frame)
    names, values = _contributions(model, frame, codes)
    tiebreak = np.zeros(len(frame))
    if model.kind == "cascade" and model.first_stage is not None:
        # inside the re-ranked tier, candidates the re-ranker cannot tell apart keep the first stage's order
        tiebreak = _contributions(model.first_stage, frame, codes)[1].sum(axis=1)
    return names, values, tiebreak


def _fused_score(model: FusionModel, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The fused score and the tie-break key, in frame order."""
    if model.kind == "lambdamart":
        return _lambdamart_scores(model, frame), np.zeros(len(frame))
    _, values, tiebreak = _fused(model, frame)
    return values.sum(axis=1), tiebreak


def _contributions(
    model: FusionModel, frame: pd.DataFrame, codes: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Contribution column names and values (rows x columns), one per signal plus `c_bias` where the kind
    has one; each row sums to the fused score."""
    names = [contribution_column(s) for s in model.signals]
    if model.kind == "weighted":
        normalized = _normalize(_signal_matrix(frame, model.signals), codes, model.normalization)
        weights = np.array([model.weights.get(s, 0.0) for s in model.signals])
        return names, normalized * weights
    if model.kind == "lambdamart":
        return [*names, BIAS_COLUMN], _lambdamart_contributions(model, frame)
    if model.kind == "cascade":
        return _cascade_contributions(model, frame, codes)
    raise DataError(f"unknown fusion kind {model.kind!r}; known kinds: {', '.join(KINDS)}")


def _lambdamart_inputs(model: FusionModel, frame: pd.DataFrame) -> np.ndarray:
    """The booster's input matrix (rows x signals, in the model's order): what LightGBM and the TreeSHAP
    tables both read, with no frame around it for them to take apart again."""
    if model.booster is None:
        raise DataError("this lambdamart fusion has no booster; load it with FusionModel.load")
    return _signal_matrix(frame, model.signals)


def _lambdamart_contributions(model: FusionModel, frame: pd.DataFrame) -> np.ndarray:
    """TreeSHAP contributions (rows x signals + bias) of a LambdaMART fusion; each row sums to its score."""
    features = _lambdamart_inputs(model, frame)
    if len(frame) == 0:
        # LightGBM refuses empty input; a request without candidates has nothing to score
        return np.zeros((0, len(model.signals) + 1))
    tables = _shap_tables(model)
    if tables is not None:
        return tables.contributions(features)
    contrib = np.asarray(
        model.booster.predict(features, pred_contrib=True, num_threads=model.threads), dtype=float
    )
    return contrib.reshape(len(frame), len(model.signals) + 1)


def _shap_tables(model: FusionModel) -> TreeShapTables | None:
    """The booster's TreeSHAP tables (`fusionrank.treeshap`), built on first use and kept with the model;
    None for a model they cannot describe (LightGBM's own TreeSHAP answers then)."""
    if model._shap is None:
        try:
            model._shap = TreeShapTables.from_booster(model.booster)
        except DataError:
            model._shap = False
    return model._shap or None


def _lambdamart_scores(model: FusionModel, frame: pd.DataFrame) -> np.ndarray:
    """A LambdaMART fusion's raw scores (what its contributions sum to, to float rounding)."""
    features = _lambdamart_inputs(model, frame)
    if len(frame) == 0:
        return np.zeros(0)
    return np.asarray(model.booster.predict(features, raw_score=True, num_threads=model.threads), dtype=float)


def _cascade_contributions(
    model: FusionModel, frame: pd.DataFrame, codes: np.ndarray
) -> tuple[list[str], np.ndarray]:
    if model.first_stage is None or model.k is None or model.rerank_signal is None:
        raise DataError("a cascade fusion needs a first stage, k and a rerank signal")
    first_names, first = _contributions(model.first_stage, frame, codes)
    first_score = first.sum(axis=1)
    top = _within_query_position(frame, first_score) < model.k
    rerank = _signal_matrix(frame, [model.rerank_signal])
    # the re-ranker is min-max normalised among the shortlisted rows only: the rest never needs its score
    rerank_norm = _normalize(np.where(top[:, None], rerank, np.nan), codes, "minmax")[:, 0]
    # each query's shortlist sits above every first-stage score of that query: offset = max + 1
    offset = _group_reduce(np.fmax, first_score[:, None], codes, -np.inf)[codes, 0] + 1.0
    names = _unique([*first_names, contribution_column(model.rerank_signal), BIAS_COLUMN])
    out = np.zeros((len(frame), len(names)))
    for j, name in enumerate(first_names):
        out[:, names.index(name)] = np.where(top, 0.0, first[:, j])
    out[:, names.index(contribution_column(model.rerank_signal))] = np.where(top, rerank_norm, 0.0)
    bias = names.index(BIAS_COLUMN)
    out[:, bias] = np.where(top, offset, out[:, bias])
    return names, out


def _query_codes(frame: pd.DataFrame) -> np.ndarray:
    return pd.factorize(frame["qid"].to_numpy())[0].astype(np.int64)


def _group_reduce(ufunc: np.ufunc, values: np.ndarray, codes: np.ndarray, initial: float) -> np.ndarray:
    """`ufunc` folded over each query's rows: one row per query (code), one column per input column."""
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    out = np.full((n_groups, values.shape[1]), initial, dtype=float)
    ufunc.at(out, codes, values)
    return out


def _normalize(values: np.ndarray, codes: np.ndarray, method: str) -> np.ndarray:
    """Each column normalised per query as ranx defines it (min-max, zmuv, rank); a missing value becomes
    0, as ranx gives a document absent from a run."""
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "minmax":
            low = _group_reduce(np.fmin, values, codes, np.inf)[codes]
            high = _group_reduce(np.fmax, values, codes, -np.inf)[codes]
            out = (values - low) / np.maximum(high - low, 1e-9)
        elif method == "zscore":
            count = _group_reduce(np.add, present.astype(float), codes, 0.0)
            mean = _group_reduce(np.add, np.where(present, values, 0.0), codes, 0.0) / count
            squares = np.where(present, (values - mean[codes]) ** 2, 0.0)
            std = np.sqrt(_group_reduce(np.add, squares, codes, 0.0) / count)
            out = (values - mean[codes]) / np.maximum(std[codes], 1e-9)
        elif method == "rank":
            count = _group_reduce(np.add, present.astype(float), codes, 0.0)[codes]
            out = 1.0 - (_descending_rank(values, codes) - 1.0) / count
        else:
            raise ConfigError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return np.where(present, out, 0.0)


def _descending_rank(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """1-based rank of each value within its query, highest first, ties sharing their average rank."""
    ranks = np.empty_like(values)
    for j in range(values.shape[1]):
        column = values[:, j]
        order = np.lexsort((-column, codes))
        sorted_codes, sorted_values = codes[order], column[order]
        position = _slots(sorted_codes) + 1.0
        new_run = np.r_[
            True, (sorted_codes[1:] != sorted_codes[:-1]) | (sorted_values[1:] != sorted_values[:-1])
        ]
        run = np.cumsum(new_run) - 1
        average = np.bincount(run, weights=position) / np.bincount(run)
        ranks[order, j] = average[run]
    return ranks


def _signal_matrix(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """`frame[columns]` as a float matrix; an absent column is all NaN (missing, not an error)."""
    out = np.full((len(frame), len(columns)), np.nan)
    present = [c for c in columns if c in frame.columns]
    if present:
        try:
            values = frame[present].to_numpy(dtype=float, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            bad = [c for c in present if not pd.api.types.is_numeric_dtype(frame[c])]
            raise DataError(f"signal column(s) {bad} must be numeric ({exc})") from exc
        out[:, [list(columns).index(c) for c in present]] = values
    return out


def _within_query_position(frame: pd.DataFrame, scores: np.ndarray) -> np.ndarray:
    """0-based position of each row in its query when sorted by `scores` descending (ties: `tie_keys`)."""
    codes = pd.factorize(frame["qid"].to_numpy())[0]
    order = np.lexsort((tie_keys(frame["qid"], frame["product_id"]), -scores, codes))
    position = np.empty(len(scores), dtype=np.int64)
    position[order] = _slots(codes[order])
    return position


def _slots(sorted_codes: np.ndarray) -> np.ndarray:
    """0-based position of each element inside its run of equal consecutive codes."""
    if len(sorted_codes) == 0:
        return np.zeros(0, dtype=np.int64)
    index = np.arange(len(sorted_codes))
    first = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    return index - np.maximum.accumulate(np.where(first, index, 0))


def _graded_labels(gain: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Integer labels for LightGBM and each label's gain (the gain itself, so NDCG stays linear)."""
    levels = np.unique(np.round(gain, 9))
    if len(levels) > MAX_LABEL_LEVELS:
        raise DataError(
            f"gain has {len(levels)} distinct values; LambdaMART needs graded relevance "
            f"(at most {MAX_LABEL_LEVELS} levels): round or bin the gains first"
        )
    if levels[0] < 0:
        raise DataError(f"gain must not be negative, found {levels[0]}")
    labels = np.searchsorted(levels, np.round(gain, 9)).astype(np.int32)
    return labels, [float(v) for v in levels]


def _group_sizes(qid: pd.Series) -> np.ndarray:
    return qid.groupby(qid.to_numpy(), sort=False).size().to_numpy()


def _check_signals(signals: Sequence[str]) -> list[str]:
    if isinstance(signals, str):
        raise ConfigError(f"signals must be a list of column names, got the string {signals!r}")
    signals = list(signals)
    if not signals:
        raise ConfigError("a fusion needs at least one signal column")
    if len(set(signals)) != len(signals):
        raise ConfigError(f"signal columns repeat: {signals}")
    reserved = [s for s in signals if s in {"qid", "product_id", "gain", "score", "rank"}]
    if reserved or any(contribution_column(s) == BIAS_COLUMN for s in signals):
        raise ConfigError(f"{reserved or signals}: not usable as signal columns (reserved names)")
    return signals


def _check_frame(frame: pd.DataFrame, signals: Sequence[str], need_gain: bool) -> None:
    """DataError naming what breaks the candidate-frame contract."""
    required = ["qid", "product_id", *(["gain"] if need_gain else [])]
    missing = [c for c in [*required, *signals] if c not in frame.columns]
    if missing:
        raise DataError(f"candidate frame lacks column(s) {missing}; it has {list(frame.columns)}")
    if need_gain:
        if len(frame) == 0:
            raise DataError("candidate frame is empty: nothing to fit on")
        gain = pd.to_numeric(frame["gain"], errors="coerce")
        if gain.isna().any():
            raise DataError(
                f"candidate frame has {int(gain.isna().sum())} row(s) with a missing or non-numeric gain"
            )
        if not gain.gt(0).any():
            raise DataError("candidate frame has no row with a positive gain: no ranking can be learned")
    codes = pd.factorize(frame["qid"].to_numpy())[0]
    if len(codes) > 1 and (np.diff(codes) < 0).any():
        raise DataError("rows of one qid must be contiguous in the candidate frame (sort or group by qid)")


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _Objective:
    """ranx metrics of rankings of one frame's rows, with the qrels built once.

    ranx's `evaluate` takes padded arrays (one [doc, score] matrix per query) as well as Run objects; it
    gives the same figures (checked in the tests) at a fraction of the cost, which the weight search needs.
    Padding has doc id -1 and gain 0, which ranx never counts. Gains are scaled so the smallest positive one
    is 1: ranx counts only grades >= 1 as relevant, and its linear-gain NDCG is unchanged by the scale.
    """

    def __init__(self, frame: pd.DataFrame, metrics: str | list[str]) -> None:
        self.metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        self.depth = _run_depth(self.metrics)
        gain = frame["gain"].to_numpy(dtype=float)
        codes, uniques = pd.factorize(frame["qid"].to_numpy(), sort=True)
        judged = np.zeros(len(uniques), dtype=bool)
        judged[codes[gain > 0]] = True
        # queries without a positive gain are left out, as ranx leaves out queries absent from the qrels
        self.query_index = np.full(len(uniques), -1, dtype=np.int64)
        self.query_index[judged] = np.arange(int(judged.sum()))
        self.qids = [str(q) for q in np.asarray(uniques)[judged]]
        self.n_queries = len(self.qids)
        self.codes = codes
        self.ties = tie_keys(frame["qid"], frame["product_id"])
        self.rows = np.flatnonzero(judged[codes]) if len(codes) else np.zeros(0, dtype=np.int64)
        positive = np.flatnonzero(gain > 0)
        scale = 1.0 / gain[positive].min() if len(positive) else 1.0
        # ideal order (gain descending) inside each query: ranx reads the ideal DCG from the qrels' order
        positive = positive[np.lexsort((positive, -gain[positive], codes[positive]))]
        self.qrels = self._padded(positive, gain[positive] * scale, width=None)

    def __call__(self, scores: np.ndarray, tiebreak: np.ndarray | None = None) -> float:
        """The first metric's mean."""
        return float(self.evaluate(scores, tiebreak=tiebreak)[self.metrics[0]])

    def evaluate(
        self, scores: np.ndarray, per_query: bool = False, tiebreak: np.ndarray | None = None
    ) -> dict[str, Any]:
        from ranx import evaluate

        if self.n_queries == 0:
            return {m: (np.zeros(0) if per_query else float("nan")) for m in self.metrics}
        scores = np.where(np.isnan(scores), -np.inf, scores)
        rows = self.rows
        secondary = np.zeros(len(rows)) if tiebreak is None else -tiebreak[rows]
        order = rows[np.lexsort((self.ties[rows], secondary, -scores[rows], self.codes[rows]))]
        run = self._padded(order, scores[order], width=self.depth)
        # ranx 0.3.21 raises KeyError for the per-query scores of a lone metric with a cutoff: ask twice
        names = self.metrics * 2 if per_query and len(self.metrics) == 1 else self.metrics
        result = evaluate(self.qrels, run, names, return_mean=not per_query, save_results_in_run=False)
        if not isinstance(result, dict):
            result = {self.metrics[0]: result}
        return {m: (np.asarray(v, dtype=float) if per_query else float(v)) for m, v in result.items()}

    def _padded(self, rows: np.ndarray, values: np.ndarray, width: int | None) -> np.ndarray:
        """One [row id, value] matrix per judged query, rows in the given (query-grouped) order."""
        codes = self.codes[rows]
        keep = self.query_index[codes] >= 0
        rows, values, codes = rows[keep], values[keep], codes[keep]
        slot = _slots(codes)
        full = int(slot.max()) + 1 if len(slot) else 1
        width = full if width is None else max(1, min(width, full))
        out = np.zeros((self.n_queries, width, 2), dtype=np.float64)
        out[:, :, 0] = -1.0
        within = slot < width
        out[self.query_index[codes[within]], slot[within], 0] = rows[within]
        out[self.query_index[codes[within]], slot[within], 1] = values[within]
        return out


def _run_depth(metrics: Sequence[str]) -> int | None:
    """How many top results the metrics read: the largest cutoff, or None when one has no cutoff."""
    depth = 0
    for metric in metrics:
        name = metric.split("-l")[0]
        if "@" not in name:
            return None
        depth = max(depth, int(name.split("@")[1]))
    return depth or None
