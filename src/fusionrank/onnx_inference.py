"""int8 CPU inference of the two BERT encoders with ONNX Runtime.

A served request runs at most a few short forward passes (one context, a few re-ranked pairs), where
PyTorch's per-operator overhead dominates. The model is exported to ONNX when it is loaded (PyTorch's
TorchScript-based exporter), its MatMul weights quantized to int8 per output channel
(`onnxruntime.quantization.quantize_dynamic`; activations are quantized per call, per tensor), and run by
ONNX Runtime with the thread count torch has.

Measured on this 2-core CPU, MiniLM-L6 embedding one 5-word query, one thread (`/tmp` script, session 6):

| runtime | p50 ms | mean cosine with fp32 (8 queries) |
|---|---:|---:|
| PyTorch fp32 | 11.1 | 1 |
| PyTorch int8 (`torch.ao.quantization.quantize_dynamic`) | 4.2 | 0.948 |
| ONNX Runtime fp32 | 3.5 | 1.000 (max abs. difference 1e-7) |
| ONNX Runtime int8, per-tensor weights | 0.9 | 0.965 |
| ONNX Runtime int8, per-channel weights (used) | 1.0 | 0.994 |

`benchmarks/bench_dense.py` measures it on the current machine. The exported graph takes the token ids, the
token types and the 0/1 token mask of a padded batch; the attention mask is built inside the graph from the
token mask, so padded rows score as they would alone (the export is traced on a batch with padding).

onnxruntime and onnx are imported here only: `fusionrank.bert` and `fusionrank.biencoder` stay importable
with torch and transformers alone (the GPU machine has no onnxruntime and needs none: int8 is a CPU path).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fusionrank.errors import ConfigError

OPSET = 17
Output = Literal["embedding", "logit"]


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drops onnxruntime.quantization's advice to run its shape pre-processing (on the root logger, at every
    quantization): it serves static quantization; dynamic quantization of these graphs needs none."""
    return not record.getMessage().startswith("Please consider to run pre-processing")


class _Exported(torch.nn.Module):
    """What the ONNX graph computes: a pooled, unit-length embedding or the first logit of each row."""

    def __init__(self, model: torch.nn.Module, output: Output) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        from fusionrank.bert import attention_mask_4d
        from fusionrank.biencoder import mean_pooled

        # the 4-D mask the PyTorch path passes too, built in the graph so that no branch on "is there any
        # padding" is traced into it
        mask = attention_mask_4d(keep.bool(), self.model)
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask)
        if self.output == "logit":
            return out.logits[:, 0].float()
        return mean_pooled(out.last_hidden_state, keep.bool())


class OnnxInt8Model:
    """An int8 ONNX Runtime session of a BERT encoder: `run(ids, types, keep)` -> embeddings or logits."""

    def __init__(self, session: object) -> None:
        self.session = session

    @classmethod
    def from_torch(
        cls, model: torch.nn.Module, output: Output, threads: int | None = None, quantize: bool = True
    ) -> OnnxInt8Model:
        """Export `model` (a CPU BERT, fp32), quantize its weights to int8 and open a session.

        `quantize=False` keeps the exported fp32 graph (the tests compare it with PyTorch's scores)."""
        try:
            import onnxruntime
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError as exc:
            raise ConfigError(
                "int8 CPU inference runs on ONNX Runtime, which is not installed: "
                "pip install onnxruntime onnx"
            ) from exc
        if next(model.parameters()).device.type != "cpu":
            raise ConfigError("int8 inference runs on a CPU only; load the model on the CPU")
        wrapped = _Exported(model, output).float().eval()
        # a traced batch with padding, so the mask path is in the graph for every batch
        ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]], dtype=torch.long)
        types = torch.zeros_like(ids)
        keep = (ids != 0).long()
        axes = {"input_ids": {0: "batch", 1: "width"}, "token_type_ids": {0: "batch", 1: "width"}}
        axes |= {"keep": {0: "batch", 1: "width"}, "out": {0: "batch"}}
        with tempfile.TemporaryDirectory(prefix="fusionrank-onnx-") as tmp:
            fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            with warnings.catch_warnings(), torch.inference_mode():
                # the TorchScript-based exporter is deprecated in favour of the torch.export one, which
                # needs onnxscript (not in this stack); it exports these encoders exactly (see the tests)
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped,
                    (ids, types, keep),
                    str(fp32),
                    input_names=["input_ids", "token_type_ids", "keep"],
                    output_names=["out"],
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    dynamo=False,
                )
                if quantize:
                    root = logging.getLogger()
                    root.addFilter(_not_preprocessing_advice)
                    try:
                        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
                    finally:
                        root.removeFilter(_not_preprocessing_advice)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = onnxruntime.InferenceSession(
                str(int8 if quantize else fp32), options, providers=["CPUExecutionProvider"]
            )
        return cls(session)

    def run(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
        """[B, dim] float32 embeddings or [B] float32 logits of one padded batch."""
        feed = {
            "input_ids": input_ids.numpy().astype(np.int64, copy=False),
            "token_type_ids": token_type_ids.numpy().astype(np.int64, copy=False),
            "keep": keep.numpy().astype(np.int64, copy=False),
        }
        (out,) = self.session.run(None, feed)
        return np.asarray(out, dtype=np.float32)
