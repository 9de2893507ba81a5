"""The bi-encoder (distillation, int8 inference) and the dense signal built on it, on a tiny BERT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fusionrank.bert import make_tiny_bert
from fusionrank.biencoder import (
    BiEncoder,
    BiEncoderConfig,
    _group_loss,
    _training_groups,
    dense_pair_scores,
    finetune_bi_encoder,
)
from fusionrank.context import Context, RankingExample
from fusionrank.errors import ConfigError, DataError
from fusionrank.signals.base import load_signal
from fusionrank.signals.dense import DenseSignal, fused_retrieve
from fusionrank.steps import embed_ids, generator_recall

WORDS = ["drill", "hammer", "paint", "lamp", "pipe", "saw", "tile", "fan"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def toy_pairs(groups: int = 40, teacher: bool = True) -> pd.DataFrame:
    """Each query names a word; its positive product carries the word, its negatives other words."""
    rows = []
    for q in range(groups):
        word = WORDS[q % len(WORDS)]
        rows.append((f"{word} {q}", f"{word} model {q}", 2.0, f"g{q}", 3.0))
        for j in range(5):
            other = WORDS[(q + j + 1) % len(WORDS)]
            rows.append((f"{word} {q}", f"{other} item {j}", 0.0, f"g{q}", -1.0 - j / 10))
    frame = pd.DataFrame(rows, columns=["context", "text", "label", "group", "teacher"])
    return frame if teacher else frame.drop(columns="teacher")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("temperature", 0.0),
        ("distill_weight", -1.0),
        ("teacher_scale", 0.0),
        ("max_length", 2),
        ("group_size", 0),
        ("distill_loss", "pairwise"),
    ],
)
def test_impossible_settings_are_refused_with_their_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        BiEncoderConfig(**{field: value})


@pytest.mark.parametrize("distill_loss", ["margin_mse", "listwise"])
def test_training_learns_the_toy_task_and_saves_a_loadable_checkpoint(
    tiny: Path, tmp_path: Path, distill_loss: str
) -> None:
    pairs = toy_pairs()
    before = BiEncoder.load(tiny)
    untrained = dense_pair_scores(before, pairs["context"].tolist(), pairs["text"].tolist())
    config = BiEncoderConfig(
        batch_size=8, epochs=4, learning_rate=2e-3, early_stopping_patience=4, distill_loss=distill_loss
    )
    record = finetune_bi_encoder(pairs, pairs.drop(columns="teacher"), tiny, tmp_path / "bi", config)

    assert record["distilled"] is True
    assert record["train_groups"] == 40
    first, last = record["epochs"][0], record["epochs"][-1]
    assert last["train_distill"] < first["train_distill"]
    assert (tmp_path / "bi" / "biencoder.json").is_file()
    trained = BiEncoder.load(tmp_path / "bi")
    scores = dense_pair_scores(trained, pairs["context"].tolist(), pairs["text"].tolist())
    positive = pairs["label"].to_numpy() > 0
    # the positive's margin over the negatives grows with training
    assert (
        scores[positive].mean() - scores[~positive].mean()
        > untrained[positive].mean() - untrained[~positive].mean()
    )


def test_without_a_teacher_only_the_contrastive_loss_trains(tiny: Path, tmp_path: Path) -> None:
    config = BiEncoderConfig(batch_size=8, epochs=1)
    record = finetune_bi_encoder(toy_pairs(teacher=False), None, tiny, tmp_path / "bi", config)
    assert record["distilled"] is False
    assert record["epochs"][0]["train_distill"] == 0.0


def test_groups_without_a_positive_are_skipped_and_none_at_all_is_an_error(
    tiny: Path, tmp_path: Path
) -> None:
    pairs = toy_pairs(groups=4)
    pairs.loc[pairs["group"] == "g0", "label"] = 0.0
    groups = _training_groups(pairs, BiEncoderConfig(), np.random.default_rng(0))
    assert len(groups.context_ids) == 3
    pairs["label"] = 0.0
    with pytest.raises(ConfigError, match="no training group has a positive"):
        finetune_bi_encoder(pairs, None, tiny, tmp_path / "bi", BiEncoderConfig())


def test_missing_teacher_scores_are_refused(tiny: Path, tmp_path: Path) -> None:
    pairs = toy_pairs(groups=4)
    pairs.loc[3, "teacher"] = np.nan
    with pytest.raises(ConfigError, match="teacher"):
        finetune_bi_encoder(pairs, None, tiny, tmp_path / "bi", BiEncoderConfig())


def test_other_relevant_products_of_a_group_are_not_its_negatives() -> None:
    # one group, anchor + a second relevant product + a negative; the second relevant one scores highest
    pairs = pd.DataFrame(
        {
            "context": ["q"] * 3,
            "text": ["best", "also good", "bad"],
            "label": [2.0, 1.0, 0.0],
            "group": ["g"] * 3,
            "teacher": [2.0, 1.0, 0.0],
        }
    )
    config = BiEncoderConfig(distill_weight=0.0, temperature=1.0)
    groups = _training_groups(pairs, config, np.random.default_rng(0))
    query = torch.tensor([[1.0, 0.0]])
    products = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    masked, _ = _group_loss(query, products, [0], groups, config)
    logits = query @ products.T / config.temperature
    expected = torch.logsumexp(logits[0, [0, 2]], 0) - logits[0, 0]
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked.item() < (torch.logsumexp(logits[0], 0) - logits[0, 0]).item()


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_margin_mse_compares_the_students_margins_with_the_scaled_teachers(scale: float) -> None:
    pairs = pd.DataFrame(
        {
            "context": ["q"] * 3,
            "text": ["best", "fair", "bad"],
            "label": [2.0, 0.0, 0.0],
            "group": ["g"] * 3,
            "teacher": [1.5, 0.5, -0.25],
        }
    )
    config = BiEncoderConfig(temperature=0.5, teacher_scale=scale)
    groups = _training_groups(pairs, config, np.random.default_rng(0))
    query = torch.tensor([[1.0, 0.0]])
    products = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    _, margin = _group_loss(query, products, [0], groups, config)
    anchor = products[0] @ query[0]
    student = torch.stack([anchor - products[1] @ query[0], anchor - products[2] @ query[0]]) / 0.5
    wanted = torch.tensor([1.0, 1.75]) * scale  # the teacher's margins of the anchor over each other
    assert margin.item() == pytest.approx(((student - wanted) ** 2).mean().item(), rel=1e-5)


def two_groups() -> pd.DataFrame:
    """Two groups of different lengths (3 and 2 pairs), so the listwise loss pads the shorter one."""
    return pd.DataFrame(
        {
            "context": ["q"] * 3 + ["r"] * 2,
            "text": ["best", "fair", "bad", "right", "wrong"],
            "label": [2.0, 0.0, 0.0, 1.0, 0.0],
            "group": ["g"] * 3 + ["h"] * 2,
            "teacher": [1.5, 0.5, -0.25, 0.75, 0.0],
        }
    )


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_listwise_loss_is_the_kl_from_the_scaled_teachers_distribution_over_each_group(scale: float) -> None:
    config = BiEncoderConfig(temperature=0.5, teacher_scale=scale, distill_loss="listwise")
    groups = _training_groups(two_groups(), config, np.random.default_rng(0))
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    products = torch.nn.functional.normalize(
        torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1
    ).requires_grad_()
    _, listwise = _group_loss(query, products, [0, 1], groups, config)
    listwise.backward()
    assert torch.isfinite(products.grad).all()  # the shorter group's padding passes no NaN back
    expected = []
    for row, (start, end) in enumerate([(0, 3), (3, 5)]):
        target = torch.softmax(torch.as_tensor(groups.teacher[row], dtype=torch.float32) * scale, dim=0)
        own = torch.log_softmax(products.detach()[start:end] @ query[row] / 0.5, dim=0)
        expected.append((target * (target.log() - own)).sum())
    assert listwise.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert listwise.item() > 0
    # a student whose scores are the teacher's (up to a constant per group) has nothing left to learn
    matching = groups.teacher[0] * scale / 4 + 0.1  # the student's logits below: 2 * matching / 0.5
    one = _training_groups(two_groups().iloc[:3], config, np.random.default_rng(0))
    products = torch.as_tensor(np.c_[matching, np.ones(3)], dtype=torch.float32)
    _, zero = _group_loss(torch.tensor([[2.0, 0.0]]), products, [0], one, config)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_encodings_are_unit_length_in_input_order_and_int8_stays_close(tiny: Path) -> None:
    encoder = BiEncoder.load(tiny)
    texts = ["a cordless drill with two batteries", "lamp", "", "paint roller"]
    vectors = encoder.encode(texts, batch_size=2)
    assert vectors.shape == (4, encoder.dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[1], encoder.encode(["lamp"])[0], atol=1e-5)
    quantized = encoder.int8()
    assert quantized.quantized
    assert (quantized.encode(texts) * vectors).sum(axis=1).min() > 0.95
    with pytest.raises(ConfigError, match="fp32"):
        quantized.save("unused")


@pytest.fixture(scope="module")
def products() -> pd.DataFrame:
    ids = [f"p{i}" for i in range(12)]
    titles = [f"{WORDS[i % len(WORDS)]} number {i}" for i in range(12)]
    return pd.DataFrame({"product_id": ids, "title": titles})


def test_dense_signal_scores_retrieves_and_round_trips(
    tiny: Path, products: pd.DataFrame, tmp_path: Path
) -> None:
    signal = DenseSignal.build(
        BiEncoder.load(tiny), products, embed_ids=[f"p{i}" for i in range(10)], int8=True
    )
    assert signal.coverage == pytest.approx(10 / 12)
    query, user, cold = (
        Context(query="drill"),
        Context(user_id="u", history=("p0", "p1")),
        Context(user_id="v"),
    )
    scores = signal.score_batch([query, user, cold], [["p0", "p11", "nope"], ["p2"], ["p2"]])
    assert np.isfinite(scores[0][0])
    assert np.isnan(scores[0][1:]).all()  # no embedding / not in the catalog
    assert np.isnan(scores[2]).all()  # a cold-start user without a query has no context text
    hits = signal.retrieve(user, 5)
    assert len(hits) == 5
    assert not {"p0", "p1"} & {pid for pid, _ in hits}
    assert signal.retrieve(cold, 5) == []

    signal.save(tmp_path / "dense")
    loaded = load_signal(tmp_path / "dense")
    assert isinstance(loaded, DenseSignal)
    assert loaded.encoder.quantized  # the recorded int8 choice applies on a CPU
    assert np.allclose(loaded.embeddings, signal.embeddings)
    again = DenseSignal.load(tmp_path / "dense", int8=False).score(query, ["p0", "p3"])
    assert np.allclose(again, signal.score(query, ["p0", "p3"]), atol=1e-5)


def test_the_served_signal_encodes_at_the_trained_length_and_keeps_the_training_record(
    tiny: Path, products: pd.DataFrame, tmp_path: Path
) -> None:
    config = BiEncoderConfig(batch_size=8, max_length=12, distill_weight=3.0, max_steps=2)
    finetune_bi_encoder(toy_pairs(), None, tiny, tmp_path / "bi", config)
    DenseSignal.build(BiEncoder.load(tmp_path / "bi"), products, int8=False).save(tmp_path / "dense")
    served = DenseSignal.load(tmp_path / "dense").encoder
    assert served.max_length == 12  # not the default: a long query is cut where training cut it
    assert served.record["settings"]["distill_weight"] == 3.0
    # a model without a training record keeps the length it was loaded with across a save
    plain = BiEncoder.load(tiny)
    plain.max_length = 20
    assert BiEncoder.load(plain.save(tmp_path / "plain")).max_length == 20


def test_a_damaged_embedding_file_is_named(tiny: Path, products: pd.DataFrame, tmp_path: Path) -> None:
    DenseSignal.build(BiEncoder.load(tiny), products).save(tmp_path / "dense")
    np.save(tmp_path / "dense" / "embeddings.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(DataError, match=r"embeddings\.npy"):
        DenseSignal.load(tmp_path / "dense")


class Fixed:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        return [(pid, 1.0) for pid in self.ids[:k]]


def test_hybrid_retrieval_fuses_ranks_and_recall_counts_every_judged_product() -> None:
    from fusionrank.signals.dense import dense_extras
    from fusionrank.steps import recall_generators

    first, second = Fixed(["a", "b", "c"]), Fixed(["c", "d", "a"])
    assert fused_retrieve([first, second], Context(query="q"), 4) == ["a", "c", "b", "d"]
    assert dense_extras(second, Context(query="q"), {"a", "b", "c"}, 1) == []
    assert dense_extras(second, Context(query="q"), {"a", "b", "c"}, 2) == ["d"]
    examples = [
        RankingExample(Context(query="q"), ["a"], {"a": 1.0, "d": 2.0, "z": 1.0, "x": 0.0}),
        RankingExample(Context(query="r"), ["a"], {"x": 0.0}),  # nothing relevant: left out
    ]
    second.name = "dense"
    generators = recall_generators(first, "lexical", second, hybrid_k=1, k=3)
    recall = generator_recall(examples, generators)
    # the fused top 3 is a, c, b: at the same budget a fusion can lose what one list alone found (d);
    # the hybrid set keeps the first stage's 3 and adds the dense top 1 if it lacks it (c: it has it)
    assert recall == pytest.approx({"lexical": 1 / 3, "dense": 2 / 3, "rrf@3": 1 / 3, "hybrid@3+1": 1 / 3})
    generators = recall_generators(first, "lexical", second, hybrid_k=2, k=3)
    assert generator_recall(examples, generators)["hybrid@3+2"] == pytest.approx(2 / 3)


class ByQuery:
    """A dense retriever whose answer depends on the query, answering batches only (`retrieve_batch`)."""

    name = "dense"

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.batches: list[list[str]] = []

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        raise AssertionError("every context was prefetched in one batch")

    def retrieve_batch(self, contexts: list[Context], k: int) -> list[list[tuple[str, float]]]:
        self.batches.append([str(c.query) for c in contexts])
        return [[(pid, 1.0) for pid in self.answers[str(c.query)][:k]] for c in contexts]


def test_recall_prefetches_the_dense_answers_of_every_request_in_one_batch() -> None:
    from fusionrank.steps import recall_generators

    answers = {"q": ["c", "d", "a"], "r": ["x", "y", "z"], "s": ["d", "z", "b"]}
    examples = [RankingExample(Context(query=q), ["a"], {"d": 1.0, "z": 1.0}) for q in ("q", "r", "s", "q")]
    contexts = [e.context for e in examples]
    batched = ByQuery(answers)
    generators = recall_generators(Fixed(["a", "b"]), "lexical", batched, hybrid_k=2, k=2, contexts=contexts)
    recall = generator_recall(examples, generators)
    assert batched.batches == [["q", "r", "s"]]  # each distinct context once, in one batch
    # the same figures as a retriever asked context by context
    single = {q: Fixed(ids) for q, ids in answers.items()}

    class PerContext:
        name = "dense"

        def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
            return single[str(context.query)].retrieve(context, k)

    expected = generator_recall(
        examples, recall_generators(Fixed(["a", "b"]), "lexical", PerContext(), 2, k=2)
    )
    assert recall == pytest.approx(expected)
    assert recall["dense"] == pytest.approx((1 / 2 + 0 + 1 + 1 / 2) / 4)  # q: d; r: none; s: d and z


def test_a_sampled_run_embeds_every_candidate_then_a_draw_of_the_catalog(products: pd.DataFrame) -> None:
    from fusionrank.data.contract import Tables

    tables = Tables(
        products=products, judgments=pd.DataFrame({"query": [], "product_id": [], "relevance": []})
    )
    frames = [pd.DataFrame({"product_id": ["p3", "p5"]}), pd.DataFrame({"product_id": ["p5", "p7"]})]
    ids = embed_ids(tables, frames, max_products=6, seed=0)
    assert ids[:3] == ["p3", "p5", "p7"]
    assert len(set(ids)) == len(ids) == 6
    assert embed_ids(tables, frames, max_products=0, seed=0) is None
    assert embed_ids(tables, frames, max_products=6, seed=0) == ids


def test_each_context_scores_the_catalog_alike_alone_or_in_a_batch() -> None:
    """The exact search's matrix product: each column the same whatever the others (BLAS's matrix-vector
    kernel rounds otherwise), so batched retrieval is the retrieval of each context alone."""
    from fusionrank.signals.dense import catalog_scores

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((20_000, 384)).astype(np.float32)
    vectors = rng.standard_normal((33, 384)).astype(np.float32)
    alone = [catalog_scores(embeddings, vectors[i : i + 1])[:, 0] for i in range(len(vectors))]
    for size in (2, 3, 8, 17, 33):
        together = catalog_scores(embeddings, vectors[:size])
        for i in range(size):
            assert np.array_equal(together[:, i], alone[i]), (size, i)


def test_batched_retrieval_answers_as_each_context_alone(tiny: Path, products: pd.DataFrame) -> None:
    from fusionrank.ranker import Ranker
    from fusionrank.serving_logic import retrieve_candidates, retrieve_candidates_batch
    from fusionrank.signals.bm25 import BM25Signal
    from fusionrank.signals.popularity import PopularitySignal

    dense = DenseSignal.build(BiEncoder.load(tiny), products)
    contexts = [
        Context(query="drill"),
        Context(user_id="u", history=("p0", "p1")),
        Context(user_id="v"),  # no text: no dense hits
        Context(query="paint roller", user_id="w", history=("p3",)),
        Context(query="drill"),
    ]
    # fp32 encodes the batch's texts together (their vectors differ from single passes by rounding only)
    batched = dense.retrieve_batch(contexts, 5)
    for found, context in zip(batched, contexts, strict=True):
        alone = dataclasses.replace(dense).retrieve(context, 5)  # an empty cache: encoded alone
        assert [pid for pid, _ in found] == [pid for pid, _ in alone]
        np.testing.assert_allclose([v for _, v in found], [v for _, v in alone], rtol=1e-5)
    # int8, as served on a CPU, encodes each text in its own pass: the same figures exactly
    dense.encoder = BiEncoder.load(tiny).int8()
    quantized = dataclasses.replace(dense).retrieve_batch(contexts, 5)
    assert quantized == [dataclasses.replace(dense).retrieve(c, 5) for c in contexts]
    assert batched[2] == []
    assert not {"p0", "p1"} & {pid for pid, _ in batched[1]}  # a user's history is left out

    counts = pd.DataFrame(
        {"query": [f"q{i}" for i in range(20)], "product_id": [f"p{i % 5}" for i in range(20)]}
    )
    signals = {
        "bm25": BM25Signal.fit(products),
        "dense": dense,
        "popularity": PopularitySignal.fit_judgments(counts),
    }
    titles = dict(zip(products["product_id"], products["title"], strict=True))
    ranker = Ranker(Path("."), {"serving": {"hybrid_k": 3}}, signals, {}, titles)
    assert retrieve_candidates_batch(ranker, contexts, 4) == [
        retrieve_candidates(ranker, c, 4) for c in contexts
    ]


def test_the_server_adds_the_dense_top_k_to_bm25_candidates_as_the_pipeline_did(
    tiny: Path, products: pd.DataFrame
) -> None:
    from fusionrank.ranker import Ranker
    from fusionrank.serving_logic import ServingSettings, resolve_rerank_k, retrieve_candidates
    from fusionrank.signals.bm25 import BM25Signal

    bm25 = BM25Signal.fit(products)
    dense = DenseSignal.build(BiEncoder.load(tiny), products)
    titles = dict(zip(products["product_id"], products["title"], strict=True))
    serving = {"hybrid_k": 4, "rerank_k_cpu": 5, "rerank_k_gpu": None}
    ranker = Ranker(Path("."), {"serving": serving}, {"bm25": bm25, "dense": dense}, {}, titles)
    context = Context(query="drill")
    lexical = [pid for pid, _ in bm25.retrieve(context, 3)]
    extra = [pid for pid, _ in dense.retrieve(context, 4) if pid not in lexical]
    assert retrieve_candidates(ranker, context, 3) == lexical + extra
    ranker.manifest["serving"] = {**serving, "hybrid_k": 0}
    assert retrieve_candidates(ranker, context, 3) == lexical

    from fusionrank.serving_logic import RankingLogic

    manifest = {"serving": serving, "selected_fusion": "weighted"}
    served = Ranker(Path("."), manifest, ranker.signals, {}, titles)
    RankingLogic(served, "fusionrank-ranker:test", None, ServingSettings(context_cache=7))
    assert dense.cache_size == 7  # the served dense signal keeps as many context vectors as configured
    assert resolve_rerank_k(ranker, ServingSettings()) == 5  # no cross-encoder loaded: the CPU budget
    assert resolve_rerank_k(ranker, ServingSettings(rerank_k=0)) == 0
    assert ServingSettings.from_env({"FUSIONRANK_RERANK_K": "7"}).rerank_k == 7
    assert ServingSettings.from_env({"FUSIONRANK_CONTEXT_CACHE": "0"}).context_cache == 0
    with pytest.raises(ConfigError, match="context_cache"):
        ServingSettings(context_cache=-1)
    with pytest.raises(ConfigError, match="rerank_k"):
        ServingSettings(rerank_k=-1)


def test_int8_scores_do_not_depend_on_the_requests_batched_alongside(
    tiny: Path, products: pd.DataFrame, tmp_path: Path
) -> None:
    from fusionrank.bert import CrossEncoder
    from fusionrank.ranker import bert_scores

    encoder = BiEncoder.load(tiny).int8()
    signal = DenseSignal.build(BiEncoder.load(tiny), products)
    signal.encoder = encoder
    one = Context(query="drill")
    others = [Context(query="a much longer query about paint rollers and brushes"), Context(query="fan")]
    alone = signal.score(one, ["p0", "p1"])
    fresh = dataclasses.replace(signal)  # an empty context-vector cache: "drill" is encoded again
    batched = fresh.score_batch([one, *others], [["p0", "p1"], ["p2"], ["p3"]])[0]
    assert np.array_equal(alone, batched)

    cross = CrossEncoder.load(tiny).int8()
    titles = dict(zip(products["product_id"], products["title"], strict=True))
    request = RankingExample(one, ["p0", "p1"])
    crowd = [request, *(RankingExample(c, ["p2", "p3", "p4"]) for c in others)]
    assert np.array_equal(bert_scores(cross, [request], titles), bert_scores(cross, crowd, titles)[:2])


def _record_encodes(signal: DenseSignal) -> list[list[str]]:
    """The texts of each call of the signal's encoder from now on, in a list that grows with the calls."""
    encoded: list[list[str]] = []
    encode = signal.encoder.encode

    def recording(texts, *args, **kwargs):
        encoded.append(list(texts))
        return encode(texts, *args, **kwargs)

    signal.encoder.encode = recording
    return encoded


def test_a_context_is_encoded_once_for_retrieval_and_scoring(tiny: Path, products: pd.DataFrame) -> None:
    signal = DenseSignal.build(BiEncoder.load(tiny), products)
    encoded = _record_encodes(signal)
    context = Context(query="drill")
    top = signal.retrieve(context, 3)
    scores = signal.score(context, [pid for pid, _ in top])
    assert encoded == [["drill"]]  # the second use reads the cached vector
    np.testing.assert_allclose(scores, [score for _, score in top], rtol=1e-6)
    signal.score_batch([Context(query="fan"), context], [["p0"], ["p1"]])
    assert encoded == [["drill"], ["fan"]]  # only the new text is encoded

    signal.cache_size = 1  # the oldest vectors leave first
    signal.score(Context(query="saw"), ["p0"])
    signal.score(context, ["p0"])
    assert encoded[2:] == [["saw"], ["drill"]]


def test_precomputed_history_vectors_replace_the_encoder_for_their_texts_only(
    tiny: Path, products: pd.DataFrame, tmp_path: Path
) -> None:
    signal = DenseSignal.build(BiEncoder.load(tiny), products, int8=True)
    stored = Context(user_id="u", history=("p0", "p1"))
    assert signal.precompute([stored, Context(user_id="v"), stored]) == 1  # distinct, non-empty texts
    expected = signal.encoder.encode(signal.context_texts([stored]))[0]

    # a server loads the signal int8; the stored user's text reads the full-precision vector
    signal.save(tmp_path / "dense")
    loaded = DenseSignal.load(tmp_path / "dense")
    assert loaded.encoder.quantized
    assert len(loaded.known) == 1
    encoded = _record_encodes(loaded)
    # the same history sent by another user, or read from the store, is the same text
    same = Context(user_id="w", history=("p0", "p1"))
    scores = loaded.score_batch([stored, same], [["p2", "p3"], ["p2"]])
    assert encoded == []
    np.testing.assert_allclose(scores[0], loaded.embeddings[[2, 3]] @ expected, rtol=1e-6)
    hits = loaded.retrieve(stored, 3)
    assert encoded == []
    assert not {"p0", "p1"} & {pid for pid, _ in hits}

    # a history that moved on since the model was built is encoded, by the server's own encoder
    moved = Context(user_id="u", history=("p0", "p1", "p5"))
    loaded.score(moved, ["p2"])
    assert encoded == [loaded.context_texts([moved])]

    # saving a signal without precomputed vectors leaves no stale files behind
    signal.precompute([])
    signal.save(tmp_path / "dense")
    assert len(DenseSignal.load(tmp_path / "dense").known) == 0
    assert not (tmp_path / "dense" / "context_vectors.npy").exists()


def test_a_damaged_precomputed_vector_file_is_named(
    tiny: Path, products: pd.DataFrame, tmp_path: Path
) -> None:
    signal = DenseSignal.build(BiEncoder.load(tiny), products)
    signal.precompute([Context(user_id="u", history=("p0",)), Context(user_id="v", history=("p1",))])
    signal.save(tmp_path / "dense")
    np.save(tmp_path / "dense" / "context_vectors.npy", np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"context_vectors\.npy"):
        DenseSignal.load(tmp_path / "dense")


class RankedRetriever:
    """Ranks the catalog p0, p1, ... for every context: the top `k` of that order."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def retrieve(self, context: Context, k: int) -> list[tuple[str, float]]:
        return [(pid, float(-rank)) for rank, pid in enumerate(self.ids[:k])]


@pytest.mark.parametrize(
    ("negatives", "hard_pool", "expected"),
    [(3, 4, {"title 0", "title 2", "title 3"}), (3, 2, {"title 0"}), (0, 30, set()), (2, 30, None)],
)
def test_training_pairs_take_unjudged_negatives_from_the_retrievers_top_hard_pool_only(
    negatives: int, hard_pool: int, expected: set[str] | None
) -> None:
    from types import SimpleNamespace

    from fusionrank.steps import training_pairs

    ids = [f"p{i}" for i in range(10)]
    tables = SimpleNamespace(
        products=pd.DataFrame({"product_id": ids, "title": [f"title {i}" for i in range(10)]})
    )
    train = pd.DataFrame({"query": ["drill", "drill"], "product_id": ["p1", "p5"], "relevance": [3.0, 1.0]})
    pairs = training_pairs(
        tables,
        "search",
        train,
        0,
        0,
        retriever=RankedRetriever(ids),
        negatives=negatives,
        hard_pool=hard_pool,
    )
    judged = pairs[pairs["text"].isin({"title 1", "title 5"})]
    assert sorted(judged["label"]) == [0.0, 2.0]  # gains: relevance - 1
    unjudged = set(pairs["text"]) - {"title 1", "title 5"}
    assert (pairs.loc[pairs["text"].isin(unjudged), "label"] == 0.0).all()
    if expected is not None:
        assert unjudged == expected
    else:  # two of the other eight
        assert len(unjudged) == negatives
        assert unjudged <= {f"title {i}" for i in (0, 2, 3, 4, 6, 7, 8, 9)}
