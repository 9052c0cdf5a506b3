"""ONNX export of a model over a quantized (bitsandbytes 4-bit) base: base linears as ``MatMulNBits``.

before → after: ``Packed4bitLinear`` (NF4/FP4 nibbles + block absmax) in the PyTorch graph → an fp32 ONNX
graph over the dequantized base (:func:`graphadapt.quantized.dense_base`), whose base ``MatMul`` nodes
onnxruntime's ``MatMulNBitsQuantizer`` then turns into ``com.microsoft.MatMulNBits`` (int4 or int8,
block-affine round-to-nearest over the dequantized weight). Adapters stay separate ``MatMul`` nodes in
fp32 (``merge=False``) or are folded before the base is quantized (``merge=True``).

Why re-quantize instead of copying the NF4 bytes: ``MatMulNBits`` stores ``(q - zero_point) * scale``
with integer ``q`` on a uniform grid; NF4's 16 levels are the normal distribution's quantiles (and FP4's
a float grid), not a uniform grid, so no choice of scale and zero point reproduces them. The int4 file
therefore holds a second quantization of the dequantized NF4 weights. Verification is split in two:

* **exact part** (the project's fp32 tolerances): onnxruntime against the PyTorch model whose base
  weights are the int4 values read back from the file (dequantized with ``MatMulNBits``' own formula) —
  a failure here is an export bug, not quantization noise;
* **quantization drift** (reported, not gated): max |onnxruntime − the PyTorch model over the packed NF4 base|
  and its RMS relative to the outputs' RMS, i.e. what the int4 re-quantization costs.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphadapt.errors import ExportError
from graphadapt.quantized import dense_base, has_quantized_weights

_BITS = {"int4": 4, "int8": 8}


def _module_path(node) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def quantize_onnx_matmuls(path: str | Path, module_paths: set[str], bits: int = 4, block_size: int = 32,
                          symmetric: bool = True) -> dict[str, str]:
    """Rewrite the ``MatMul`` nodes of the ONNX file at ``path`` that run the linear layers ``module_paths``
    (found by the exporter's ``name_scopes`` metadata) as ``MatMulNBits``; returns ``{node name: module path}``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = Path(path)
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    chosen = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            mp = _module_path(n)
            if mp in module_paths:
                chosen[n.name] = mp
    missing = module_paths - set(chosen.values())
    if missing:
        raise ExportError(f"found no MatMul over a constant weight for {len(missing)} quantized linear(s) in the "
                          f"exported graph (e.g. `{sorted(missing)[0]}`); cannot write them as MatMulNBits")
    external = any(i.HasField("data_location") and i.data_location == onnx.TensorProto.EXTERNAL
                   for i in onnx.load(str(path), load_external_data=False).graph.initializer)
    others = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather", "GatherElements")
              and n.name not in chosen]
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 nodes_to_exclude=others)
        q.process()
    finally:
        logger.setLevel(level)
    out = q.model.model
    done = {n.name for n in out.graph.node if n.op_type == "MatMulNBits"}
    named = {}
    for n in out.graph.node:
        if n.op_type == "MatMulNBits":
            src = next((c for c in (n.name, n.name.rpartition("_Q")[0]) if c in chosen), None)
            if src is not None:
                named[n.name] = chosen[src]
    if len(named) != len(chosen):
        raise ExportError(f"onnxruntime's MatMulNBitsQuantizer quantized {len(done)} of {len(chosen)} base MatMuls")
    for f in path.parent.glob(path.name + ".data"):
        f.unlink()
    if external:
        onnx.save(out, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(out, str(path))
    return named


def dequantize_matmulnbits(model, node) -> np.ndarray:
    """The dense ``[N, K]`` (PyTorch ``[out, in]``) weight a ``MatMulNBits`` node multiplies by:
    ``(q - zero_point) * scale`` per block along K (onnxruntime's contrib-op definition)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    nb = -(-k // bs)
    b = numpy_helper.to_array(inits[node.input[1]]).reshape(n, nb, -1)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, nb)
    if bits == 4:
        q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, -1)[:, :, :bs].astype(np.float32)
    else:
        q = b.reshape(n, nb, -1)[:, :, :bs].astype(np.float32)
    mid = float(2 ** (bits - 1))
    zp = np.full((n, nb), mid, np.float32)
    if len(node.input) > 3 and node.input[3] and node.input[3] in inits:
        z = numpy_helper.to_array(inits[node.input[3]])
        if z.dtype == np.uint8 and bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :nb]
        zp = z.reshape(n, nb).astype(np.float32)
    w = (q - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, nb * bs)[:, :k]


def export_onnx_quantized(model: torch.nn.Module, path: str | Path, quantize: str = "int4", *, export,
                          block_size: int = 32, merge: bool = True, verify: bool = True,
                          example_inputs: dict[str, Any] | None = None, atol: float | None = None,
                          rtol: float | None = None, **kwargs):
    """``export_onnx(model, path, quantize="int4"|"int8")`` for a model over a bitsandbytes 4-bit base
    (module docstring). Returns the :class:`ExportReport` with ``quantization`` filled in: ``bits``,
    ``block_size``, ``nodes`` (MatMulNBits written), ``drift_max_abs`` / ``drift_rel_rms`` (against the
    PyTorch model over its packed base) and ``verified_against`` (what the exact check compared).
    ``export``: :func:`graphadapt.exporters.onnx.export_onnx` (passed in: that module calls this one)."""
    import onnx

    from graphadapt.exporters.verify import verify_onnx

    if quantize not in _BITS:
        raise ExportError(f"quantize must be one of {sorted(_BITS)} (MatMulNBits bits), got {quantize!r}")
    if not has_quantized_weights(model):
        raise ExportError("quantize= exports a model over a quantized base (graphadapt.apply(..., quantize='nf4') "
                          "or a bitsandbytes 4-bit model); this model's base is dense")
    if kwargs.get("swappable") or kwargs.get("dtype", "fp32") not in ("fp32", torch.float32) or kwargs.get("optimize"):
        raise ExportError("quantize= exports fp32 activations without swappable=/optimize= for now; drop them")
    path = Path(path)
    with dense_base(model) as dense:
        report = export(model, path, example_inputs=example_inputs, merge=merge, verify=False, **kwargs)
    bits = _BITS[quantize]
    named = quantize_onnx_matmuls(path, set(dense.paths), bits=bits, block_size=block_size)
    proto = onnx.load(str(path))
    weights = {named[n.name]: dequantize_matmulnbits(proto, n) for n in proto.graph.node if n.name in named}
    del proto
    info: dict[str, Any] = {"bits": bits, "block_size": block_size, "nodes": len(named), "symmetric": True,
                            "base": dense.kind}
    if verify:
        from graphadapt.exporters._model import example_inputs as resolve_inputs

        inputs = resolve_inputs(model, example_inputs)
        result = _verify_against_int4(model, path, weights, merge, inputs, atol, rtol, verify_onnx)
        drift = _drift(model, path, inputs)
        info["drift_max_abs"], info["drift_rel_rms"] = drift
        info["verified_against"] = f"the PyTorch model over the int{bits} weights read back from the file"
        report.verified = True
        report.max_abs_diff, report.max_rel_diff = result.max_abs_diff, result.max_rel_diff
        report.atol, report.rtol = result.atol, result.rtol
        report.providers, report.verify_input_shapes = result.providers, result.input_shapes
    report.quantization = info
    report.file_size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
    return report


def _first(out) -> torch.Tensor:
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _drift(model, path, inputs) -> tuple[float, float]:
    """max |onnxruntime − the model over its packed base| and that difference's RMS over the output's RMS
    (first output, on ``inputs``)."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = _first(model(**inputs)).float()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]).float()
    del sess
    d = got - ref
    return d.abs().max().item(), (d.square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-30)).item()


def _verify_against_int4(model, path, weights, merge, inputs, atol, rtol, verify_onnx):
    """:func:`verify_onnx` with the dense base replaced by the file's int4 weights (merged first when the
    export merged)."""
    with dense_base(model):
        merged = False
        if merge:
            model.merge(strict=False)
            merged = True
        try:
            for mp, w in weights.items():
                mod = model.get_submodule(mp)
                old = mod._parameters["weight"]
                mod._parameters["weight"] = torch.nn.Parameter(torch.from_numpy(w).to(old.dtype), requires_grad=False)
            return verify_onnx(path, model, example_inputs=inputs, atol=atol, rtol=rtol)
        finally:
            if merged:
                model.unmerge()


__all__ = ["export_onnx_quantized", "quantize_onnx_matmuls", "dequantize_matmulnbits"]
