"""SASRec, the sequential CF signal, on a toy catalog whose next purchase follows from the last one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.context import Context
from fusionrank.errors import ConfigError, DataError
from fusionrank.signals import load_signal
from fusionrank.signals.sequential import SASRecConfig, SASRecSignal

ITEMS = [f"i{k}" for k in range(12)]
SMALL = SASRecConfig(
    max_length=8,
    dim=16,
    heads=2,
    layers=1,
    dropout=0.0,
    epochs=12,
    learning_rate=0.02,
    batch_size=64,
    patience=3,
)


def _cycles(users: int, length: int, seed: int) -> pd.DataFrame:
    """Each user walks the catalog forwards from a random item: i3 is always followed by i4."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(len(ITEMS)))
        for step in range(length):
            rows.append(
                (
                    f"u{u}",
                    ITEMS[(start + step) % len(ITEMS)],
                    pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=step),
                )
            )
    return pd.DataFrame(rows, columns=["user_id", "product_id", "event_timestamp"])


@pytest.fixture(scope="module", params=[0, 8], ids=["full-softmax", "sampled-softmax"])
def fitted(request: pytest.FixtureRequest) -> SASRecSignal:
    """Trained with each loss: over the whole catalog (the default), and against 8 drawn items."""
    events = _cycles(120, 6, seed=0)
    ordered = events.sort_values(["user_id", "event_timestamp"])
    last = ordered.groupby("user_id").tail(1)
    train = ordered.drop(last.index)
    return SASRecSignal.fit(train, valid=last, config=dataclasses.replace(SMALL, negatives=request.param))


def test_sasrec_learns_which_purchase_follows_which(fitted: SASRecSignal) -> None:
    assert fitted.retrieve(Context(history=("i1", "i2", "i3")), 1)[0][0] == "i4"
    assert fitted.retrieve(Context(history=("i2", "i3", "i4")), 1)[0][0] == "i5"
    scores = fitted.score(Context(history=("i3",)), ["i4", "i9"])
    assert scores.dtype == np.float32
    assert scores.argmax() == 0
    history = fitted.fit_info["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert max(r["valid_ndcg10"] for r in history) > 0.9  # the held-out next purchase ranks first
    assert fitted.fit_info["best_epoch"] == max(history, key=lambda r: r["valid_ndcg10"])["epoch"]


def test_unknown_products_rank_last_and_a_history_without_known_products_scores_zero(
    fitted: SASRecSignal,
) -> None:
    scores = fitted.score(Context(history=("i1",)), ["i2", "never-seen", "i7"])
    assert scores[1] == pytest.approx(min(scores[0], scores[2]) - 1.0)
    assert fitted.score(Context(history=("never-seen",)), ["i2", "i3"]).tolist() == [0.0, 0.0]
    assert fitted.retrieve(Context(user_id="new"), 3) == []
    assert "i3" not in [pid for pid, _ in fitted.retrieve(Context(history=("i3",)), 5)]


def test_a_request_scores_the_same_alone_or_batched_and_after_a_save(
    fitted: SASRecSignal, tmp_path: Path
) -> None:
    context = Context(history=("i7", "i8"))
    candidates = ["i9", "i0", "i4"]
    alone = fitted.score(context, candidates)
    crowd = [Context(history=tuple(ITEMS[:8])), context, Context(history=())]
    batched = fitted.score_batch(crowd, [["i1"], candidates, ["i2"]])[1]
    np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-6)
    loaded = load_signal(fitted.save(tmp_path / "sasrec"))
    assert isinstance(loaded, SASRecSignal)
    assert loaded.config == fitted.config
    np.testing.assert_array_equal(loaded.score(context, candidates), alone)


def test_impossible_settings_and_unusable_data_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of heads"):
        SASRecConfig(dim=10, heads=3)
    with pytest.raises(ConfigError, match="epochs"):
        SASRecConfig(epochs=0)
    with pytest.raises(ConfigError, match="negatives"):
        SASRecConfig(negatives=-1)
    one_each = _cycles(5, 1, seed=1)
    with pytest.raises(DataError, match="at least two training events"):
        SASRecSignal.fit(one_each, config=SMALL)
    saved = SASRecSignal.fit(_cycles(10, 3, seed=2), config=SASRecConfig(dim=8, heads=1, epochs=1)).save(
        tmp_path / "s"
    )
    (saved / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(DataError, match=r"model\.safetensors"):
        load_signal(saved)


def test_a_recommendation_run_fits_sasrec_and_tests_the_published_protocol_users(data_dir: Path) -> None:
    from fusionrank.data.sources import load_source, sample
    from fusionrank.splits import split_recommendation
    from fusionrank.steps import build_examples, fit_signals

    tables = sample(load_source("amazon-games", data_dir), max_users=300, seed=0)
    parts = split_recommendation(tables.interactions)
    config = SASRecConfig(dim=16, heads=1, layers=1, epochs=1)
    signals = fit_signals(tables, "recommendation", parts["train"], parts["valid"], config)
    assert isinstance(signals["sasrec"], SASRecSignal)
    assert "sasrec" not in fit_signals(tables, "recommendation", parts["train"])

    test = build_examples(tables, "recommendation", parts, signals, "test", 20, 50, seed=0)
    listed = tables.eval_candidates
    published = set(listed.loc[listed["protocol"] == "llmrank-6k", "user_id"].astype(str))
    assert len(test) == 50
    assert {e.context.user_id for e in test} <= published
    valid = build_examples(tables, "recommendation", parts, signals, "valid", 20, 0, seed=0)
    assert len(valid) == parts["valid"]["user_id"].nunique()  # validation keeps every held-out user
