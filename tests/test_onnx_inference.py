"""int8 inference on ONNX Runtime: the exported graph scores as PyTorch does, padding included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusionrank.bert import CrossEncoder, _longest_first, default_base_model, encode_pairs, make_tiny_bert
from fusionrank.biencoder import BiEncoder
from fusionrank.onnx_inference import OnnxInt8Model

TEXTS = ["a cordless drill with two batteries and a charger", "lamp", "paint roller", "white ceiling fan"]
PRODUCTS = ["drill kit 20v", "desk lamp with usb port and dimmer", "roller", "fan blade set"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def test_the_exported_graph_embeds_padded_batches_as_pytorch_does(tiny: Path) -> None:
    encoder = BiEncoder.load(tiny)
    exported = BiEncoder(
        encoder.model,
        encoder.tokenizer,
        encoder.max_length,
        onnx=OnnxInt8Model.from_torch(encoder.model, "embedding", quantize=False),
    )
    # one batch of four texts of different lengths: the short ones are padded
    assert np.allclose(exported.encode(TEXTS, batch_size=4), encoder.encode(TEXTS, batch_size=4), atol=1e-5)
    assert np.allclose(exported.encode(TEXTS[1:2])[0], encoder.encode(TEXTS, batch_size=4)[1], atol=1e-5)


def test_the_exported_cross_encoder_scores_padded_batches_as_pytorch_does(tiny: Path) -> None:
    cross = CrossEncoder.load(tiny)
    exported = CrossEncoder(cross.model, cross.tokenizer, cross.max_length)
    exported.onnx = OnnxInt8Model.from_torch(cross.model, "logit", quantize=False)
    pairs = encode_pairs(cross.tokenizer, TEXTS, PRODUCTS, cross.max_length)
    widths = {width for *_, width in _longest_first(pairs, 4)}
    assert len(set(pairs.lengths.tolist())) > 1  # padding
    assert len(widths) == 1  # one batch
    assert np.allclose(exported.score(TEXTS, PRODUCTS, batch_size=4), cross.score(TEXTS, PRODUCTS), atol=1e-5)


def test_int8_minilm_embeds_queries_close_to_fp32(data_dir: Path) -> None:
    """MiniLM-L6 (the pipeline's base model) on real Home Depot queries: int8 per-channel weights keep the
    embeddings within a few degrees of fp32 (PyTorch's own int8 dynamic quantization gave a mean cosine of
    0.948 on such queries; see `fusionrank.onnx_inference`)."""
    queries = pd.read_csv(data_dir / "homedepot" / "train.csv.zip", encoding="latin-1", nrows=200)[
        "search_term"
    ]
    texts = list(dict.fromkeys(queries.astype(str)))[:40]
    encoder = BiEncoder.load(default_base_model())
    quantized = encoder.int8()
    assert quantized.quantized
    assert not encoder.quantized
    # one text per call, as the dense signal encodes them when quantized
    int8 = np.concatenate([quantized.encode([t]) for t in texts])
    cosines = (int8 * encoder.encode(texts)).sum(axis=1)
    assert cosines.mean() > 0.98
    assert cosines.min() > 0.95
    assert cosines.max() < 1 - 1e-6  # quantized for real: an fp32 graph would give cosine 1


def test_int8_cross_encoder_scores_every_pair(tiny: Path) -> None:
    cross = CrossEncoder.load(tiny)
    quantized = cross.int8()
    assert quantized.quantized
    assert not cross.quantized
    scores = quantized.score(TEXTS, PRODUCTS)
    assert scores.shape == (4,)
    assert np.all(np.isfinite(scores))
    assert np.allclose(scores, cross.score(TEXTS, PRODUCTS), atol=1e-3)
    assert not np.allclose(scores, cross.score(TEXTS, PRODUCTS), rtol=0, atol=1e-8)  # int8, not fp32


def test_a_model_on_another_device_is_refused(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fusionrank.errors import ConfigError

    encoder = BiEncoder.load(tiny)
    monkeypatch.setattr(encoder.model, "parameters", lambda: iter([torch.empty(0, device="meta")]))
    with pytest.raises(ConfigError, match="CPU only"):
        OnnxInt8Model.from_torch(encoder.model, "embedding")
