"""ONNX export of a model over a quantized base (bitsandbytes 4-/8-bit, torchao): base linears as ``MatMulNBits``.

before → after: ``Packed4bitLinear`` (NF4/FP4 nibbles + block absmax) in the PyTorch graph → an ONNX graph
whose base ``MatMul`` nodes are ``com.microsoft.MatMulNBits`` (int4 or int8, symmetric block-affine
round-to-nearest of the dequantized weight, packed by onnxruntime's own ``MatMulNBitsQuantizer`` routine,
``DefaultWeightOnlyQuantizer.qbits_block_quant``). Adapters stay separate ``MatMul`` nodes in fp32
(``merge=False``) or are folded before the base is quantized (``merge=True``).

Memory (streamed, like the out-of-core export of :mod:`graphadapt.outofcore`): the graph is traced with
every base linear's weight an untouched placeholder allocation (no resident pages), so no dense copy of
the base is ever made. The ``MatMul`` over each placeholder is then rewritten to ``MatMulNBits`` whose
packed weight and scales are lazy initializers: when the file's external data is written, each base linear
in turn is dequantized from its packed bytes (and folded, when merged), block-quantized and written, then
dropped. Peak: the packed base, the dense non-linear tensors in fp32 and one layer's weight.

Why re-quantize instead of copying the NF4 bytes: ``MatMulNBits`` stores ``(q - zero_point) * scale``
with integer ``q`` on a uniform grid; NF4's 16 levels are the normal distribution's quantiles (and FP4's
a float grid), not a uniform grid, so no choice of scale and zero point reproduces them. The int4 file
therefore holds a second quantization of the dequantized NF4 weights. Verification is split in two:

* **exact part** (the project's fp32 tolerances): onnxruntime against the PyTorch model whose base
  weights are the int4 values read back from the file (dequantized with ``MatMulNBits``' own formula,
  each linear's weight read from the file right before its use, never all at once) — a failure here is an
  export bug, not quantization noise;
* **quantization drift** (reported, not gated): max |onnxruntime − the PyTorch model over the packed NF4 base|
  and its RMS relative to the outputs' RMS, i.e. what the int4 re-quantization costs.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from graphadapt.errors import ExportError
from graphadapt.quantized import DenseBaseLinear, PACKED, dense_stand_ins, has_quantized_weights, linear_4bit

_BITS = {"int4": 4, "int8": 8}
_LIFTED = "model."  # the adapted model's attribute in a swappable export's traced wrapper


def _module_path(node) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def _nbits_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without its side effect: at import it
    calls ``logging.basicConfig(level=INFO)``, which would make the root logger print every INFO line of
    the ONNX exporter's passes in the caller's process. The root logger is put back as it was."""
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)


def quantize_onnx_matmuls(path: str | Path, module_paths: set[str], bits: int = 4, block_size: int = 32,
                          symmetric: bool = True) -> dict[str, str]:
    """Rewrite the ``MatMul`` nodes of the ONNX file at ``path`` that run the linear layers ``module_paths``
    (found by the exporter's ``name_scopes`` metadata) as ``MatMulNBits``; returns ``{node name: module path}``."""
    import onnx

    MatMulNBitsQuantizer = _nbits_module().MatMulNBitsQuantizer
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


def _dequantize(k: int, n: int, bits: int, bs: int, b: np.ndarray, scales: np.ndarray,
                zero_points: np.ndarray | None) -> np.ndarray:
    nb = -(-k // bs)
    b = b.reshape(n, nb, -1)
    scales = scales.astype(np.float32).reshape(n, nb)
    if bits == 4:
        q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, -1)[:, :, :bs].astype(np.float32)
    else:
        q = b.reshape(n, nb, -1)[:, :, :bs].astype(np.float32)
    mid = float(2 ** (bits - 1))
    zp = np.full((n, nb), mid, np.float32)
    if zero_points is not None:
        z = zero_points
        if z.dtype == np.uint8 and bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :nb]
        zp = z.reshape(n, nb).astype(np.float32)
    w = (q - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, nb * bs)[:, :k]


def dequantize_matmulnbits(model, node, base_dir: str | Path = "") -> np.ndarray:
    """The dense ``[N, K]`` (PyTorch ``[out, in]``) weight a ``MatMulNBits`` node multiplies by:
    ``(q - zero_point) * scale`` per block along K (onnxruntime's contrib-op definition). Reads only this
    node's initializers (from external data beside ``base_dir`` when the model was loaded without it)."""
    import onnx
    from onnx import numpy_helper

    def read(name):
        init = next(i for i in model.graph.initializer if i.name == name)
        if init.data_location == onnx.TensorProto.EXTERNAL:  # onnx loads external data into the proto it is
            t = onnx.TensorProto()                           # given: read into a copy, keep the model light
            t.CopyFrom(init)
            init = t
        return numpy_helper.to_array(init, str(base_dir))

    attrs = {a.name: a.i for a in node.attribute}
    zp = None
    if len(node.input) > 3 and node.input[3]:
        zp = read(node.input[3])
    return _dequantize(attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"], read(node.input[1]),
                       read(node.input[2]), zp)


# ----------------------------------------------------------------------------------------- streamed export
class _PackedSource:
    """The quantized base linears' weights as a weight source of :func:`graphadapt.exporters.dtype.converted_copy`
    (the interface of :class:`graphadapt.outofcore.WeightSource`): the export copy holds placeholders for
    them and each is dequantized from its packed bytes only when asked for (one at a time)."""

    def __init__(self, packed: dict[str, torch.nn.Module]):
        self.packed = {f"{p}.weight": m for p, m in packed.items()}
        # a swappable export traces the model inside a wrapper (swappable._LiftedModule) as ``model``
        self.packed.update({f"{_LIFTED}{k}": m for k, m in list(self.packed.items())})

    def is_hollow(self, name: str) -> bool:
        return name in self.packed

    def read_hollow(self, name: str) -> torch.Tensor | None:
        m = self.packed.get(name)
        return None if m is None else m.dequantize()


@contextlib.contextmanager
def placeholder_base(gm: torch.nn.Module) -> Iterator[dict[str, torch.nn.Module]]:
    """For the duration of the block, every packed base linear of ``gm`` is a :class:`DenseBaseLinear` whose
    weight is an untouched allocation of the dense shape and compute dtype (the kernel maps its pages only
    when written: no resident memory; its values are garbage) and its ``linear_4bit`` calls are plain
    ``aten.linear`` — a model to trace, never to compute with. Yields ``{path: packed module}``; everything
    is restored on exit. (:func:`graphadapt.quantized.dense_base` installs the dequantized weights instead.)"""
    found = [(p, m) for p, m in gm.named_modules() if isinstance(m, PACKED)]
    with dense_stand_ins(gm, found, lambda m: torch.empty((m.out_features, m.in_features), dtype=m.compute_dtype)):
        yield dict(found)


class _ToMatMulNBits:
    """Rewrites the traced ONNX program (before it is saved): each ``MatMul`` over a base linear's weight
    initializer becomes ``MatMulNBits`` with lazy ``B``/``scales`` initializers, computed from that weight's
    value (itself lazy: dequantized, folded) when the external data is written — one linear at a time."""

    def __init__(self, paths: set[str], bits: int, block_size: int, source: _PackedSource):
        self.paths, self.bits, self.block_size, self.source = paths, bits, block_size, source
        self.named: dict[str, str] = {}  # MatMulNBits node name -> module path
        self.found: dict[str, str] = {}  # initializer name -> module path (identify)

    def identify(self, program, export_model) -> None:
        """Before the lazy folds replace them: name the initializers that hold a base weight (``W.T``, as the
        exporter writes a linear's weight for ``MatMul``) — a view of the export copy's placeholder (large
        weights), else equal to the copy's transposed value (small ones the exporter folded). The exporter's
        ``name_scopes`` metadata names the same nodes where it is present; a swappable export's wrapper
        loses it."""
        params = dict(export_model.named_parameters(remove_duplicate=False))
        spans, small = [], {}
        for path in self.paths:
            t = params.get(f"{path}.weight", params.get(f"{_LIFTED}{path}.weight"))
            if t is None:
                continue
            spans.append((t.data_ptr(), t.data_ptr() + t.nbytes, path, tuple(t.shape[::-1])))
            if t.numel() <= (1 << 16):
                small.setdefault(tuple(t.shape[::-1]), []).append((path, t))
        for value in program.model.graph.initializers.values():
            const = value.const_value
            if const is None or len(const.shape) != 2:
                continue
            shape = tuple(int(d) for d in const.shape)
            ptr = _data_address(const)
            if ptr is not None:
                hit = next((path for start, end, path, tshape in spans if start <= ptr < end), None)
                if hit is not None:
                    if shape == next(ts for _, _, p, ts in spans if p == hit):
                        self.found[value.name] = hit
                    continue
            for path, t in small.get(shape, ()):
                if np.array_equal(const.numpy(), t.detach().T.numpy()):
                    self.found[value.name] = path
                    break

    def quantizer(self):
        mod = _nbits_module()
        return mod.DefaultWeightOnlyQuantizer(mod.DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=True, bits=self.bits))

    def __call__(self, program) -> None:
        import onnx_ir as ir
        from onnx_ir.convenience import replace_nodes_and_values

        graph = program.model.graph
        quantizer = self.quantizer()
        chosen = []
        for node in graph:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            w = node.inputs[1]
            if w is None or w.const_value is None or not w.is_initializer():
                continue
            mp = self.found.get(w.name)
            if mp is None:
                scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
                mp = ast.literal_eval(scopes)[-2] if scopes and len(ast.literal_eval(scopes)) >= 2 else None
            if mp in self.paths and len(w.const_value.shape) == 2:
                chosen.append((node, mp))
        missing = self.paths - {mp for _, mp in chosen}
        if missing:
            raise ExportError(f"found no MatMul over a constant weight for {len(missing)} quantized linear(s) in the "
                              f"exported graph (e.g. `{sorted(missing)[0]}`); cannot write them as MatMulNBits")
        kpack = 8 // self.bits
        for node, mp in chosen:
            w = node.inputs[1]
            k, n = (int(d) for d in w.const_value.shape)
            nb = -(-k // self.block_size)
            blob = -(-self.block_size // kpack)
            parts: dict[str, np.ndarray] = {}
            const = w.const_value

            def part(key, const=const, parts=parts, name=w.name):
                # B and scales come from one quantization; whichever is written first computes both,
                # the other takes its share and nothing is kept after
                if key not in parts:
                    dense = np.ascontiguousarray(const.numpy(), dtype=np.float32)
                    parts["B"], parts["scales"], _ = quantizer.qbits_block_quant(dense)
                    del dense
                return ir.Tensor(parts.pop(key), name=f"{name}_Q{self.bits}" if key == "B" else f"{name}_scales")

            b_val = ir.Value(name=f"{w.name}_Q{self.bits}", shape=ir.Shape([n, nb, blob]),
                             type=ir.TensorType(ir.DataType.UINT8),
                             const_value=ir.LazyTensor(lambda part=part: part("B"), dtype=ir.DataType.UINT8,
                                                       shape=ir.Shape([n, nb, blob]), name=f"{w.name}_Q{self.bits}"))
            s_val = ir.Value(name=f"{w.name}_scales", shape=ir.Shape([n, nb]), type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.LazyTensor(lambda part=part: part("scales"), dtype=ir.DataType.FLOAT,
                                                       shape=ir.Shape([n, nb]), name=f"{w.name}_scales"))
            graph.register_initializer(b_val)
            graph.register_initializer(s_val)
            new = ir.Node("com.microsoft", "MatMulNBits", [node.inputs[0], b_val, s_val],
                          attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", self.bits),
                                      ir.AttrInt64("block_size", self.block_size)],
                          name=f"{node.name}_Q{self.bits}", metadata_props=dict(node.metadata_props))
            replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))
            if not w.uses() and w.name in graph.initializers:
                del graph.initializers[w.name]  # read by nothing else: its dense value is never written
            self.named[new.name] = mp
        program.model.opset_imports.setdefault("com.microsoft", 1)


def _data_address(const) -> int | None:
    """Address of the data of an initializer backed by a torch tensor or numpy array (a view's: its own start)."""
    raw = getattr(const, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.data_ptr()
    if isinstance(raw, np.ndarray):
        return raw.__array_interface__["data"][0]
    return None


class _FileWeights:
    """Each ``MatMulNBits`` weight of an ONNX file, dequantized on request from the file (only that node's
    initializers are read)."""

    def __init__(self, path: Path, named: dict[str, str]):
        import onnx

        self.path = path
        self.proto = onnx.load(str(path), load_external_data=False)
        self.nodes = {named[n.name]: n for n in self.proto.graph.node if n.name in named}

    def weight(self, module_path: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(
            dequantize_matmulnbits(self.proto, self.nodes[module_path], self.path.parent)))


class FileWeightLinear(torch.nn.Module):
    """A base linear of the verification reference whose ``weight`` is the ``MatMulNBits`` weight read back
    from the exported file on each read (the graph reads it right before its use): never held at rest."""

    def __init__(self, weights: _FileWeights, path: str, bias, dtype: torch.dtype):
        super().__init__()
        self._weights, self._path, self._dtype = weights, path, dtype
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        w = self._weights.weight(self._path)
        return w if w.dtype == self._dtype else w.to(self._dtype)


def export_onnx_quantized(model: torch.nn.Module, path: str | Path, quantize: str = "int4", *, export, commit,
                          block_size: int = 32, merge: bool = True, verify: bool = True,
                          example_inputs: dict[str, Any] | None = None, atol: float | None = None,
                          rtol: float | None = None, **kwargs):
    """``export_onnx(model, path, quantize="int4"|"int8")`` for a model over a quantized base (module
    docstring). Returns the :class:`ExportReport` with ``quantization`` filled in: ``bits``,
    ``block_size``, ``nodes`` (MatMulNBits written), ``drift_max_abs`` / ``drift_rel_rms`` (against the
    PyTorch model over its packed base), ``verified_against`` (what the exact check compared) and ``linears``
    (``{MatMulNBits node name: module path}``); the report's ``peak_rss`` and ``seconds`` gain ``verify`` and
    ``drift``. ``swappable=True`` (``max_rank=``) writes the adapters as swap slots over the int4 base
    (:mod:`graphadapt.exporters.swappable`; implies ``merge=False``).
    ``export``: :func:`graphadapt.exporters.onnx.export_onnx`, ``commit``: its move-into-place step (passed in:
    that module calls this one)."""

    if quantize not in _BITS:
        raise ExportError(f"quantize must be one of {sorted(_BITS)} (MatMulNBits bits), got {quantize!r}")
    if not has_quantized_weights(model):
        raise ExportError("quantize= exports a model over a quantized base (graphadapt.apply(..., quantize='nf4') "
                          "or a bitsandbytes 4-bit model); this model's base is dense")
    if kwargs.get("dtype", "fp32") not in ("fp32", torch.float32) or kwargs.get("optimize"):
        raise ExportError("quantize= exports fp32 activations without optimize= for now; drop dtype=/optimize=")
    swappable = bool(kwargs.get("swappable"))
    if swappable:
        merge = False  # the adapters are graph inputs (swap slots) over the int4 base
    import shutil
    import tempfile

    from graphadapt._io import signals_as_exceptions
    from graphadapt.errors import VerificationError
    from graphadapt.writes import claim_export

    path = Path(path)
    bits = _BITS[quantize]
    # written and checked in a temp folder beside ``path``, moved into place only once verified (as every
    # export): a failed check leaves ``path`` as it was
    claim_export(path, kwargs.pop("overwrite", False), ExportError)
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_as_exceptions():
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            tmp = tmpdir / path.name
            report, info = _export_and_check(model, tmp, bits, block_size, merge, verify, example_inputs, atol, rtol,
                                             export, kwargs)
            commit(tmp, path, True)
        except VerificationError as e:
            e.args = (f"{e.args[0] if e.args else e} Nothing was written to {path}.", *e.args[1:])
            raise
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    report.path = path
    if report.external_data is not None:
        report.external_data = path.with_name(path.name + ".data")
    report.quantization = info
    report.file_size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
    return report


def _export_and_check(model, path: Path, bits: int, block_size: int, merge: bool, verify: bool, example_inputs,
                      atol, rtol, export, kwargs):
    """The export to ``path`` (a temp location) and its two-part check; returns ``(report, quantization info)``."""
    from graphadapt.exporters._memory import PeakRSS, release_memory

    with placeholder_base(model) as packed:
        source = _PackedSource(packed)
        rewrite = _ToMatMulNBits(set(packed), bits, block_size, source)
        kind = next(iter(packed.values())).quant_type
        report = export(model, path, example_inputs=example_inputs, merge=merge, verify=False,
                        _packed_base=(source, rewrite), **kwargs)
    named = rewrite.named
    info: dict[str, Any] = {"bits": bits, "block_size": block_size, "nodes": len(named), "symmetric": True,
                            "base": kind, "linears": dict(named)}
    if verify:
        from graphadapt.exporters._model import example_inputs as resolve_inputs
        from graphadapt.exporters.verify import verify_onnx

        inputs = resolve_inputs(model, example_inputs)
        memory = PeakRSS()
        release_memory()
        t = time.perf_counter()
        with memory.phase("verify"):
            ref = _int4_reference(model, path, named, merge, inputs)
            result = verify_onnx(path, model, example_inputs=inputs, atol=atol, rtol=rtol, reference=ref.pop)
        report.seconds["verify"] = time.perf_counter() - t
        release_memory()
        t = time.perf_counter()
        with memory.phase("drift"):
            drift = _drift(model, path, inputs)
        report.seconds["drift"] = time.perf_counter() - t
        report.peak_rss.update(memory.peaks)
        info["drift_max_abs"], info["drift_rel_rms"] = drift
        info["verified_against"] = (f"the PyTorch model over the int{bits} weights read back from the file "
                                    "(one linear at a time)")
        report.verified = True
        report.max_abs_diff, report.max_rel_diff = result.max_abs_diff, result.max_rel_diff
        report.atol, report.rtol = result.atol, result.rtol
        report.providers, report.verify_input_shapes = result.providers, result.input_shapes
        report.verify_parts = getattr(result, "parts", 1)
    return report, info


def _int4_reference(model, path: Path, named: dict[str, str], merge: bool, inputs) -> list:
    """``[reference]``: the fp32 export copy of ``model`` (merged as the export was) whose base linears read
    the file's int4/int8 weights, each right before its use (:class:`FileWeightLinear`)."""
    from graphadapt.exporters import _model
    from graphadapt.exporters.dtype import converted_copy

    with placeholder_base(model) as packed:
        variant = _model.for_inputs(model, inputs)
        into_copy = merge and _model.merges_into_copy(model)
        ref = converted_copy(variant, torch.float32, inputs, merge=into_copy, lazy_merge=into_copy,
                             weights_from=_PackedSource(packed))
    ref.__dict__.pop("graphadapt_lazy_folds", None)
    weights = _FileWeights(path, named)
    for mp in weights.nodes:
        old = ref.get_submodule(mp)
        parent, _, leaf = mp.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, leaf,
                FileWeightLinear(weights, mp, getattr(old, "bias", None), torch.float32))
    return [ref]


def _first(out) -> torch.Tensor:
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _drift(model, path, inputs) -> tuple[float, float]:
    """max |onnxruntime − the model over its packed base| and that difference's RMS over the output's RMS
    (first output, on ``inputs``)."""
    from graphadapt.exporters import _model
    from graphadapt.exporters.verify import run_onnxruntime

    with _model.inference_mode(model), torch.no_grad():
        ref = _first(model(**inputs)).float()
    outputs, _, _ = run_onnxruntime(path, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    got = torch.from_numpy(outputs[0]).float()
    d = got - ref
    return d.abs().max().item(), (d.square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-30)).item()


__all__ = ["export_onnx_quantized", "quantize_onnx_matmuls", "dequantize_matmulnbits", "placeholder_base",
           "FileWeightLinear"]
