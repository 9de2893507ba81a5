"""The BERT cross-encoder on a CPU: a tiny random BERT trained a few steps on real pairs, and its scoring."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.context import Context
from fusionrank.data.contract import Tables
from fusionrank.errors import ConfigError, DataError
from fusionrank.text import SEPARATOR, context_text, history_text, product_text

bert = pytest.importorskip(
    "fusionrank.bert", reason="torch and transformers are needed for the cross-encoder"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, two threads wait on each other ~10x slower."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Texts


def test_history_text_lists_newest_first_skips_unknown_and_repeats_and_truncates() -> None:
    titles = {"a": "Zelda", "b": "Mario  Kart\n8", "c": "Halo", "d": "Doom"}
    history = ("a", "b", "x", "c", "b", "d")  # oldest first, as Context.history holds it
    assert history_text(history, titles) == SEPARATOR.join(["Doom", "Mario Kart 8", "Halo", "Zelda"])
    assert history_text(history, titles, max_titles=2) == SEPARATOR.join(["Doom", "Mario Kart 8"])
    assert history_text((), titles) == ""


def test_context_text_joins_query_and_history_and_product_text_adds_new_facts_only() -> None:
    titles = {"a": "Zelda", "b": "Halo"}
    assert context_text(Context(query="  red  drill "), titles) == "red drill"
    assert context_text(Context(user_id="u", history=("a", "b")), titles) == f"Halo{SEPARATOR}Zelda"
    both = Context(query="shooter", user_id="u", history=("a", "b"))
    assert context_text(both, titles, max_titles=1) == f"shooter{SEPARATOR}Halo"
    assert product_text("DEWALT 20V drill", brand="DEWALT", category="Tools") == "DEWALT 20V drill (Tools)"
    assert product_text("Halo") == "Halo"


# ---------------------------------------------------------------------------------------------------------
# Settings and input checks


@pytest.mark.parametrize(
    "settings",
    [
        {"max_length": 2},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"weight_decay": -0.1},
        {"epochs": 0},
        {"warmup_ratio": 1.0},
        {"grad_accum_steps": 0},
        {"loss": "pairwise"},
        {"max_train_samples": 0},
        {"max_steps": 0},
        {"early_stopping_patience": 0},
        {"max_grad_norm": 0.0},
        {"device": "gpu0"},
    ],
)
def test_config_rejects_impossible_values(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(settings))):
        bert.FinetuneConfig(**settings)


def test_cuda_requested_without_cuda_is_a_config_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA"):
        bert.resolve_device("cuda")


def test_pair_checks_name_the_problem() -> None:
    pairs = pd.DataFrame(
        {"context": ["q"] * 3, "text": ["a", "b", "c"], "label": [1.0, 1.0, 0.0], "group": "g"}
    )
    bert.check_pairs(pairs, "train", "mse")
    with pytest.raises(DataError, match="exactly one positive"):
        bert.check_pairs(pairs, "train", "listwise")
    with pytest.raises(DataError, match="lack column"):
        bert.check_pairs(pairs.drop(columns="group"), "valid", "mse")
    with pytest.raises(DataError, match="'text' is missing"):
        bert.check_pairs(pairs.assign(text=["a", None, "c"]), "valid", "mse")


def test_ndcg_at_k_on_a_worked_example() -> None:
    # group g: gains x=2, y=1, z=0; ranked y, z, x -> DCG = 1 + 0 + 2/2 = 2; IDCG = 2 + 1/log2(3)
    groups = ["g", "g", "g", "h", "h"]
    gains = np.array([2.0, 1.0, 0.0, 0.0, 0.0])  # group h has no relevant row: left out
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.2])
    assert bert.ndcg_at_k(groups, gains, scores) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert bert.ndcg_at_k(groups, gains, scores, k=1) == pytest.approx(0.5)


def test_ndcg_at_k_gives_ties_no_credit_whatever_the_row_order() -> None:
    # one relevant row among four, all scored alike: it counts as ranked last, first row or not
    groups, scores = ["g"] * 4, np.zeros(4)
    last = 1 / math.log2(5)
    assert bert.ndcg_at_k(groups, np.array([1.0, 0, 0, 0]), scores) == pytest.approx(last)
    assert bert.ndcg_at_k(groups, np.array([0, 0, 0, 1.0]), scores) == pytest.approx(last)


# ---------------------------------------------------------------------------------------------------------
# Training a tiny BERT on real pairs


@pytest.fixture(scope="module")
def home_depot_pairs(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Real Home Depot (query, title, relevance) pairs of 300 queries, split by query 80/20."""
    from fusionrank.data.sources import load_source, sample

    tables = sample(load_source("homedepot", data_dir), max_queries=300, seed=0)
    pairs = bert.search_pairs(tables.judgments, tables.products)
    queries = pairs["group"].unique()
    held_out = pairs["group"].isin(queries[: len(queries) // 5])
    return pairs[~held_out].reset_index(drop=True), pairs[held_out].reset_index(drop=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert.make_tiny_bert(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(
    home_depot_pairs: tuple[pd.DataFrame, pd.DataFrame],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict, Path]:
    train, valid = home_depot_pairs
    output = tmp_path_factory.mktemp("checkpoint")
    config = bert.FinetuneConfig(max_length=48, batch_size=16, learning_rate=3e-3, max_steps=24, seed=1)
    return bert.finetune_cross_encoder(train, valid, tiny_model, output, config), output


def test_training_loss_falls_on_real_pairs(trained: tuple[dict, Path]) -> None:
    metrics, _ = trained
    curve = metrics["loss_curve"]
    assert metrics["steps"] == 24
    assert len(curve) == 24
    assert all(math.isfinite(v) for v in curve)
    # A random head starts near 0 against grades 1-3 (squared error ~5); a few steps learn the scale.
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5])
    assert metrics["valid_loss"] < np.mean(curve[:5])


def test_checkpoint_holds_safetensors_tokenizer_and_training_record(trained: tuple[dict, Path]) -> None:
    metrics, output = trained
    assert (output / "model.safetensors").is_file()
    assert (output / "tokenizer.json").is_file()
    record = json.loads((output / bert.TRAINING_JSON).read_text())
    assert record == json.loads(json.dumps(metrics))
    assert record["settings"]["max_length"] == 48
    assert record["settings"]["loss"] == "mse"
    assert [e["epoch"] for e in record["epochs"]] == [1]
    assert record["best_epoch"] == 1
    assert {"valid_loss", "valid_rmse", "valid_ndcg_at_10", "train_loss"} <= record["epochs"][0].keys()
    assert record["throughput"]["pairs_per_s"] > 0
    assert 0 <= record["throughput"]["padding_fraction"] < 0.5


def test_checkpoint_reloads_to_identical_scores(
    trained: tuple[dict, Path], home_depot_pairs: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    metrics, output = trained
    _, valid = home_depot_pairs
    model = bert.CrossEncoder.load(output, device="cpu")
    assert model.max_length == 48
    scores = model.score(valid["context"].tolist(), valid["text"].tolist())
    assert scores.dtype == np.float32
    labels = valid["label"].to_numpy()
    # The training loop scored the same pairs through the same class before saving: the figures must agree.
    assert np.mean((scores.astype(np.float64) - labels) ** 2) == pytest.approx(
        metrics["valid_loss"], rel=1e-6
    )
    gains = labels - labels.min()
    ndcg = bert.ndcg_at_k(valid["group"].tolist(), gains, scores)
    assert ndcg == pytest.approx(metrics["valid_ndcg_at_10"], rel=1e-6)
    again = bert.CrossEncoder.load(output, device="cpu").score(
        valid["context"].tolist(), valid["text"].tolist()
    )
    np.testing.assert_array_equal(scores, again)


def test_a_new_regression_head_starts_at_the_mean_label(
    home_depot_pairs: tuple[pd.DataFrame, pd.DataFrame], tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    headless = tmp_path / "headless"  # an encoder without a scoring head, as MiniLM ships
    AutoModel.from_pretrained(tiny_model).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(headless)
    train, _ = home_depot_pairs
    config = bert.FinetuneConfig(max_length=32, learning_rate=1e-9, max_steps=1)
    bert.finetune_cross_encoder(train, None, headless, tmp_path / "out", config)
    head = bert.CrossEncoder.load(tmp_path / "out", device="cpu").model.classifier
    assert head.bias.item() == pytest.approx(train["label"].mean(), abs=1e-4)


def test_scoring_runs_in_eval_mode_and_gives_the_model_back_in_its_mode(trained: tuple[dict, Path]) -> None:
    _, output = trained
    model = bert.CrossEncoder.load(output, device="cpu")
    assert not model.model.training
    evaluated = model.score(["drill", "saw"], ["DEWALT 20V drill", "tile saw"])
    model.model.train()  # as the training loop leaves it: dropout on
    assert all(m.training for m in model.model.modules())
    np.testing.assert_allclose(model.score(["drill", "saw"], ["DEWALT 20V drill", "tile saw"]), evaluated)
    assert all(m.training for m in model.model.modules())


def test_scoring_keeps_input_order_and_matches_a_plain_forward_pass(trained: tuple[dict, Path]) -> None:
    torch = pytest.importorskip("torch")
    _, output = trained
    model = bert.CrossEncoder.load(output, device="cpu")
    contexts = [
        "drill",
        "cordless hammer drill with two batteries and a case",
        "tile saw",
        "x" * 3,
        "led bulb 60w",
    ]
    texts = [
        "DEWALT 20V drill",
        "Ryobi ONE+ 18V hammer drill kit, batteries and charger included",
        "saw",
        "a",
        "b",
    ]
    scores = model.score(contexts, texts, batch_size=2)
    one_by_one = np.array([model.score([c], [t])[0] for c, t in zip(contexts, texts, strict=True)])
    np.testing.assert_allclose(scores, one_by_one, atol=1e-5)
    shuffled = [3, 0, 4, 1, 2]
    reordered = model.score([contexts[i] for i in shuffled], [texts[i] for i in shuffled], batch_size=3)
    np.testing.assert_allclose(reordered, scores[shuffled], atol=1e-5)
    # transformers' own padded forward pass with a 2-D mask gives the same scores as our 4-D-mask batches.
    inputs = model.tokenizer(
        contexts, texts, truncation=True, max_length=48, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        reference = model.model(**inputs).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    # The additive mask built for non-SDPA attention gives the same scores too.
    from transformers import AutoModelForSequenceClassification

    eager = AutoModelForSequenceClassification.from_pretrained(output, attn_implementation="eager")
    eager_scores = bert.CrossEncoder(eager, model.tokenizer, max_length=48).score(
        contexts, texts, batch_size=2
    )
    np.testing.assert_allclose(eager_scores, scores, atol=1e-5)
    assert model.score([], []).shape == (0,)


@pytest.fixture(scope="module")
def games(data_dir: Path) -> Tables:
    """Real Amazon Games purchase sequences of 60 users, with the whole catalog."""
    from fusionrank.data.sources import load_source, sample

    return sample(load_source("amazon-games", data_dir), max_users=60, seed=0)


def test_listwise_loss_trains_on_real_games_groups(games: Tables, tiny_model: Path, tmp_path: Path) -> None:
    pairs = bert.recommendation_pairs(games.interactions, games.products, n_negatives=3, max_titles=5)
    assert (pairs.groupby("group")["label"].agg(["sum", "size"]) == [1.0, 4]).all().all()
    users = pairs["group"].unique()
    train, valid = pairs[pairs["group"].isin(users[:45])], pairs[pairs["group"].isin(users[45:])]
    # A validation group whose positive was not retrieved is allowed; the loss leaves it out.
    unretrieved = valid[valid["label"] == 0].head(3).assign(group="no-positive")
    valid = pd.concat([valid, unretrieved], ignore_index=True)
    config = bert.FinetuneConfig(
        loss="listwise", max_length=64, batch_size=4, learning_rate=1e-3, max_steps=6
    )
    metrics = bert.finetune_cross_encoder(train, valid, tiny_model, tmp_path, config)
    assert metrics["steps"] == 6
    assert all(math.isfinite(v) for v in metrics["loss_curve"])
    # A random start is close to uniform over the 4 candidates: cross-entropy near log(4).
    assert metrics["valid_loss"] == pytest.approx(math.log(4), abs=0.5)
    assert 0 < metrics["valid_ndcg_at_10"] <= 1


def test_recommendation_pairs_use_the_history_before_the_last_item(games: Tables) -> None:
    titles = dict(zip(games.products["product_id"], games.products["title"], strict=True))
    user = games.interactions["user_id"].iloc[0]
    sequence = games.interactions[games.interactions["user_id"] == user].sort_values("event_timestamp")
    ids = sequence["product_id"].tolist()
    hard = [ids[0], "not-a-product", games.products["product_id"].iloc[-1]]
    pairs = bert.recommendation_pairs(
        games.interactions, games.products, negatives={user: hard}, n_negatives=5
    )
    group = pairs[pairs["group"] == user]
    assert group["label"].tolist() == [1.0] + [0.0] * 5
    assert group["text"].iloc[0] == product_text(titles[ids[-1]])
    assert group["text"].iloc[1] == product_text(titles[hard[2]])  # the usable hard negative comes first
    assert group["context"].iloc[0] == history_text(ids[:-1], titles)
    assert product_text(titles[ids[-1]]) not in group["context"].iloc[0].split(SEPARATOR)


# ---------------------------------------------------------------------------------------------------------
# The pretrained baseline and the metric against ranx


def test_pretrained_similarity_prefers_judged_titles_over_random_ones(
    home_depot_pairs: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    _, valid = home_depot_pairs
    best = valid[valid["label"] >= 2.5].drop_duplicates("group").head(40)
    contexts, texts = best["context"].tolist(), best["text"].tolist()
    shuffled = texts[7:] + texts[:7]
    scores = bert.pretrained_similarity(bert.default_base_model(), contexts + contexts, texts + shuffled)
    assert scores.dtype == np.float32
    assert np.all(np.abs(scores) <= 1.0 + 1e-5)
    assert scores[:40].mean() > scores[40:].mean() + 0.1
    same = bert.pretrained_similarity(bert.default_base_model(), ["cordless drill"], ["cordless drill"])
    assert same[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_ndcg_at_k_agrees_with_ranx(home_depot_pairs: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ranx = pytest.importorskip("ranx")
    train, _ = home_depot_pairs
    gains = np.rint(3 * (train["label"].to_numpy() - 1)).astype(int)  # ranx takes integer grades
    scores = np.random.default_rng(0).random(len(train))
    frame = train.assign(
        group=train["group"].astype(object),
        gain=gains,
        score=scores,
        doc=[f"d{i}" for i in range(len(train))],
    )
    frame = frame[frame.groupby("group")["gain"].transform("max") > 0]
    qrels = ranx.Qrels.from_df(frame, q_id_col="group", doc_id_col="doc", score_col="gain")
    run = ranx.Run.from_df(frame, q_id_col="group", doc_id_col="doc", score_col="score")
    expected = ranx.evaluate(qrels, run, "ndcg@10")
    actual = bert.ndcg_at_k(frame["group"].tolist(), frame["gain"].to_numpy(), frame["score"].to_numpy())
    assert actual == pytest.approx(expected, abs=1e-9)


def test_the_epoch_is_chosen_on_a_seeded_draw_of_whole_validation_requests() -> None:
    from fusionrank.steps import _sample_requests

    frame = pd.DataFrame({"qid": np.repeat([f"q{i}" for i in range(50)], 4), "product_id": list("abcd") * 50})
    picked = _sample_requests(frame, 10, seed=3)
    assert picked["qid"].nunique() == 10
    assert (picked.groupby("qid").size() == 4).all()  # a request keeps every candidate
    kept = set(picked["qid"])
    assert list(pd.unique(picked["qid"])) == [q for q in pd.unique(frame["qid"]) if q in kept]  # frame order
    pd.testing.assert_frame_equal(picked, _sample_requests(frame, 10, seed=3))
    assert _sample_requests(frame, 50, seed=3) is frame
