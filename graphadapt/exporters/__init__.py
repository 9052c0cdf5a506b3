"""Exporters: ``AdaptedModel → ONNX (fp32/fp16/bf16) → onnxruntime-verified → Triton repository``.

    report = export_onnx(model, "model.onnx", dtype="fp16")   # ExportReport
    verify_onnx("model.onnx", model)                           # VerifyResult or VerificationError
    export_triton(model, "repo", "bert", max_batch_size=8)     # repo/bert/{config.pbtxt,1/model.onnx}
    export_decoder_onnx(lm, "decoder.onnx")                    # causal LM with past key/values in and out
    export_onnx(model, "dir", layout="optimum", tokenizer=tok) # Optimum's ORTModelFor<Task> directory
"""

from __future__ import annotations

from graphadapt.exporters.onnx import ExportReport
from graphadapt.exporters.optimum_layout import export_onnx, export_optimum
from graphadapt.exporters.decoder import export_decoder_onnx, verify_decoder_onnx
from graphadapt.exporters.swappable import export_onnx_adapter, read_swappable, verify_swappable
from graphadapt.exporters.triton import export_triton, parse_config, triton_config
from graphadapt.exporters.verify import DEFAULT_TOLERANCES, VerifyResult, fresh_inputs, verify_onnx

__all__ = [
    "DEFAULT_TOLERANCES",
    "ExportReport",
    "VerifyResult",
    "export_decoder_onnx",
    "export_onnx",
    "export_optimum",
    "export_onnx_adapter",
    "read_swappable",
    "verify_swappable",
    "export_triton",
    "fresh_inputs",
    "parse_config",
    "triton_config",
    "verify_decoder_onnx",
    "verify_onnx",
]
