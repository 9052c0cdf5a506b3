"""ONNX export: ``nn.Module (+ adapters) → merged, dtype-converted copy → torch.onnx (dynamo) → model.onnx``.

The file appears atomically: everything is written into a temporary directory
beside ``path``, checked (``onnx.checker`` by path, so >2 GB works), verified
with onnxruntime, and only then moved into place. Any failure (or Ctrl-C) leaves
an earlier file at ``path`` untouched and no temporary files behind.
"""

from __future__ import annotations

import contextlib
import bisect
import collections
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from graphadapt._io import check_writable, signals_as_exceptions
from graphadapt.contract import check_export
from graphadapt.capture import serialised
from graphadapt.errors import ExportError, MergeError, VerificationError
from graphadapt.hollow import placeholders_ok
from graphadapt.exporters import _model, fusion
from graphadapt.exporters import swappable as swappable_export
from graphadapt.exporters._memory import PeakRSS, release_memory
from graphadapt.exporters.dtype import DTYPE_NAMES, cast_inputs, converted_copy, parse_dtype
from graphadapt.exporters.verify import DEFAULT_TOLERANCES, verify_onnx
from graphadapt.quantized import dense_base, has_quantized_weights

# Opsets below this need a lossy down-conversion of the dynamo exporter's graph (LayerNormalization is 17).
MIN_OPSET = 17

MERGED_KEY = "graphadapt.merged"
"""ONNX metadata key saying whether the adapters were folded into the exported weights."""
# Above this many bytes of weights, initializers go to "<name>.data" (protobuf caps a file at 2 GB,
# and saving inline serializes the weights in memory twice more: external data streams them).
EXTERNAL_DATA_THRESHOLD = 128 << 20


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    dtype: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    node_count: int
    op_histogram: dict[str, int]
    file_size: int
    external_data: Path | None = None
    merged: bool = False
    verified: bool = False
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    verify_input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reference_dtype: str | None = None
    verify_parts: int = 0  # onnxruntime sessions the verification ran the graph in (0: not verified)
    # fp16/bf16: max |PyTorch in that dtype - PyTorch computing in fp32| per output (the error allowed scales with it)
    noise_floor: dict[str, float] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rel_rms_diff: dict[str, float] = field(default_factory=dict)
    rms_tol: float | None = None
    # resident memory of this process (bytes): at the start, and the peak of each phase
    # (prepare/export/save/check/verify); None where /proc is unavailable
    rss_start: int | None = None
    peak_rss: dict[str, int] = field(default_factory=dict)
    # other graphs written with this one (the encoder of an encoder-decoder decoder export)
    parts: dict[str, "ExportReport"] = field(default_factory=dict)
    optimize: str | None = None  # export_onnx(optimize=...)
    # onnxruntime fused ops in the written graph ({"MultiHeadAttention": 12, "SkipLayerNormalization": 24, ...})
    fused_ops: dict[str, int] = field(default_factory=dict)
    # export_onnx(quantize="int4"|"int8"): MatMulNBits facts and the drift against the packed PyTorch base
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_rss_delta(self) -> int | None:
        """Largest peak over all phases minus the resident memory at the start (bytes)."""
        if self.rss_start is None or not self.peak_rss:
            return None
        return max(self.peak_rss.values()) - self.rss_start

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["external_data"] = str(self.external_data) if self.external_data else None
        d["parts"] = {k: v.to_dict() for k, v in self.parts.items()}
        return d

    def summary(self) -> str:
        """A few human-readable lines (for the CLI)."""
        mb = self.file_size / 2**20
        lines = [
            f"{self.path} ({self.dtype}, opset {self.opset}, {self.node_count} nodes, {mb:.1f} MiB"
            + (f", weights in {self.external_data.name})" if self.external_data else ")"),
            f"inputs  {self.input_names}  dynamic {self.dynamic_axes}",
            f"outputs {self.output_names}",
        ]
        if self.verified:
            worst = max(self.max_abs_diff.values(), default=0.0)
            lines.append(
                f"verified on {self.verify_input_shapes} with {self.providers[:1]}"
                + (f" in {self.verify_parts} parts" if self.verify_parts > 1 else "") + ": "
                f"max abs diff {worst:.2e} (atol {self.atol:g}, rtol {self.rtol:g})"
            )
        if self.optimize:
            lines.append(f"optimize={self.optimize!r}: fused " + (", ".join(f"{k} {v}" for k, v in self.fused_ops.items())
                                                                 or "nothing"))
        lines.append("seconds " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        if self.peak_rss_delta is not None:
            gib = 2**30
            lines.append(f"peak memory {max(self.peak_rss.values()) / gib:.2f} GiB (+{self.peak_rss_delta / gib:.2f} "
                         "over the start; " + ", ".join(f"{k} {v / gib:.2f}" for k, v in self.peak_rss.items()) + ")")
        return "\n".join(lines)


@serialised
def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, Any] | None = None,
    dynamic: bool = True,
    dtype: str | torch.dtype = "fp32",
    merge: bool = True,
    opset: int | None = None,
    verify: bool = True,
    providers: list[str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    external_data: bool | None = None,
    io_names: dict[str, str] | None = None,
    verify_fn: Any = None,
    rms_tol: float | None = None,
    verify_part_bytes: int | None = None,
    optimize: str | None = None,
    overwrite: bool = False,
    swappable: bool = False,
    max_rank: int | None = None,
    quantize: str | None = None,
    weights_from: str | os.PathLike | None = None,
    _packed_base: tuple[Any, Any] | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and (by default) verify it with onnxruntime.

    Args:
        model: takes keyword tensors (``input_ids=...``) and returns a tensor, tuple,
            dict or ``ModelOutput``. Duck-typed extras of ``AdaptedModel`` are used when present.
        example_inputs: keyword example tensors; default ``model.example_inputs()``,
            else inputs built from a transformers ``config``.
        dynamic: make batch and sequence axes symbolic (``model.dynamic_dims`` names them,
            else ``batch``/``sequence``/``decoder_sequence``).
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``; a converted copy is exported, float
            inputs are cast, integer inputs are left alone.
        merge: fold adapters into the base weights for the export (restored afterwards).
        opset: ONNX opset; default torch's recommended one.
        verify: compare with PyTorch on fresh batch/sequence sizes; raise
            :class:`VerificationError` beyond ``atol``/``rtol`` (defaults per dtype).
        providers: onnxruntime providers for verification; default CUDA when available, else CPU.
        external_data: weights in ``<path>.data``; default above 128 MiB of weights (written
            tensor by tensor; inline weights are serialized in memory).
        io_names: rename graph inputs and outputs (``{"past_key_values_0_key": "past_key_values.0.key"}``).
        verify_fn: ``(onnx_path, reference_model) -> VerifyResult`` replacing the default check
            (the decoder exporter runs a greedy decode); runs before the file is moved into place.
        rms_tol: bound on RMS(onnx - torch) / RMS(torch) per output (see :func:`verify_onnx`).
        verify_part_bytes: onnxruntime runs the graph in parts reading at most this many bytes
            of weights each (default: parts of an eighth above 256 MiB of weights), which bounds
            verification memory; every node still runs once, on the file's weights.
        optimize: None (default) writes standard ONNX that any runtime loads. ``"ort"`` writes a
            graph for onnxruntime: every attention core (``scaled_dot_product_attention``) becomes
            one ``com.microsoft::MultiHeadAttention`` (``Attention`` with packed q/k/v weights where
            the three projections read one input), then onnxruntime's transformer optimizer
            (``onnxruntime.transformers.optimizer.optimize_model``, python fusions only) fuses
            SkipLayerNormalization, BiasGelu, ...; the optimized file is what is verified and
            written. ``ExportReport.fused_ops`` counts the fused ops (docs/export.md).
        overwrite: replace an existing ``path`` that graphadapt did not export (without it such a
            file is refused before any work; an earlier graphadapt export is replaced).
        swappable: write the base graph with every active adapter as a *slot*: its tensors are graph inputs
            with defaults (initializers of the same name, the exported adapter), so onnxruntime swaps in any
            adapter file of the same sites and options (:func:`export_onnx_adapter`) in one session
            (:mod:`graphadapt.exporters.swappable`, docs/deployment.md). fp32 only; implies ``merge=False``.
        max_rank: with ``swappable``, the slots' rank (LoRA rank, bottleneck width): smaller adapters are
            zero-padded to it, exactly. Default: each exported adapter's own rank.
        quantize: ``"int4"`` / ``"int8"`` for a model over a quantized (bitsandbytes 4-bit) base: its base
            linears become onnxruntime ``MatMulNBits`` (block-affine re-quantization of the dequantized base,
            streamed one linear at a time: no dense copy of the base; adapters separate with ``merge=False``,
            as swap slots with ``swappable=True``), verified against the PyTorch model over the file's int4
            weights with these tolerances, the drift against the packed base reported in
            ``report.quantization`` (:mod:`graphadapt.exporters.quantized`, docs/big-models.md). Without it,
            such a model exports over its dequantized fp32 base.
        weights_from: out of core (:mod:`graphadapt.outofcore`): for a model built on
            ``hollow_model(checkpoint)`` (whose checkpoint is the default), the checkpoint directory its base
            weights are read from, one tensor at a time, while the external data is written (folded when
            merged); the PyTorch reference of the verification reads them the same way. Export in the
            checkpoint's dtype.
        _packed_base: internal (``quantize=``): ``(weight source, rewrite)`` — base weights are placeholders
            read from the source while the file is written, and ``rewrite(program)`` turns their ``MatMul``
            nodes into ``MatMulNBits`` before it is saved (:mod:`graphadapt.exporters.quantized`).

    Raises:
        ExportError: with a one-line cause (full exception chained as ``__cause__``).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    try:
        tdtype = parse_dtype(dtype)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give the path of the .onnx file to write")
    if not path.parent.is_dir():
        raise ExportError(f"directory {path.parent} does not exist; create it before exporting to {path.name}")
    _check_opset(opset)
    fusion.check_optimize(optimize)
    if swappable and (tdtype != torch.float32 or optimize):
        raise ExportError("swappable=True exports fp32 without optimize= for now; drop dtype/optimize")
    if max_rank is not None and not swappable:
        raise ExportError("max_rank is the rank of swappable slots; pass swappable=True with it")
    if quantize is not None and weights_from is not None:
        raise ExportError("quantize= exports a model held in memory; weights_from= (out of core) streams fp16/fp32 "
                          "weights: pass one of them")
    if quantize is not None:  # base linears as MatMulNBits (graphadapt.exporters.quantized)
        from graphadapt.exporters.quantized import export_onnx_quantized

        return export_onnx_quantized(model, path, quantize, export=export_onnx, commit=_commit, merge=merge, verify=verify, example_inputs=example_inputs,
                                     atol=atol, rtol=rtol, dynamic=dynamic, dtype=dtype, opset=opset,
                                     external_data=external_data, io_names=io_names, overwrite=overwrite,
                                     swappable=swappable, max_rank=max_rank, optimize=optimize)
    if has_quantized_weights(model):  # a packed 4-bit base exports over its dequantized (dense) weights
        with dense_base(model):
            return export_onnx(model, path, example_inputs, dynamic, dtype, merge, opset, verify, providers, atol,
                               rtol, external_data, io_names, verify_fn, rms_tol, verify_part_bytes, optimize,
                               overwrite, swappable, max_rank)
    check_writable(path.parent, ExportError, "output directory")
    from graphadapt.writes import claim_export

    claim_export(path, overwrite, ExportError)
    source = _packed_base[0] if _packed_base is not None else _weight_source(model, weights_from, tdtype, swappable,
                                                                              verify_fn)
    inputs = _model.example_inputs(model, example_inputs)
    # the module serving these inputs (an adapted model's signature variant) is exported; merging is
    # decided on ``primary``, whose merge state the variant follows
    primary, model = model, _model.for_inputs(model, inputs)
    axes = _model.dynamic_axes(model, inputs, dynamic)
    check_export(model, inputs, dynamic, ExportError)  # graphadapt.contract: missing inputs, fixed-batch compositions
    traced, trace_inputs, lifted = model, inputs, None
    if swappable:  # adapter tensors become static graph inputs (with defaults, added after the export)
        lifted = swappable_export.lift(model, max_rank, list(inputs))
        traced, trace_inputs, merge = lifted.module, {**inputs, **lifted.inputs}, False
        axes = {**axes, **{k: {} for k in lifted.inputs}}
        io_names = {**(io_names or {}), **lifted.io_names}

    memory = PeakRSS()
    # a graphadapt model is merged into the export copy, weight by weight, and never itself;
    # other models with merge()/unmerge() are merged for the export and restored afterwards
    into_copy = merge and _model.merges_into_copy(primary)
    with _model.inference_mode(model), _model.merged_for_export(primary, merge and not into_copy) as merged:
        merged = merged or into_copy
        # merged weights are computed while the file is written, one at a time (never all held);
        # a custom verify_fn takes the export copy as its reference, which then needs real values
        t = time.perf_counter()
        with memory.phase("prepare"):
            export_model, export_inputs, names = _prepare(traced, trace_inputs, tdtype, into_copy,
                                                          lazy=into_copy and verify_fn is None, weights_from=source)
        seconds["prepare"] = time.perf_counter() - t

        t = time.perf_counter()
        with memory.phase("export"):
            program = _torch_onnx_export(export_model, export_inputs, axes, names, opset, optimize)
            if _packed_base is not None:
                _packed_base[1].identify(program, export_model)  # which initializer is which base weight
            if not _install_lazy_folds(program, export_model):
                if source is not None:
                    raise ExportError("the exporter transformed a base weight read from the checkpoint (constant "
                                      "folding), so it cannot be streamed; this model cannot be exported out of core")
                # the exporter transformed a placeholder weight (constant folding): export from real values
                del program, export_model
                release_memory()
                export_model, export_inputs, names = _prepare(traced, trace_inputs, tdtype, into_copy, lazy=False)
                program = _torch_onnx_export(export_model, export_inputs, axes, names, opset, optimize)
            if optimize == "ort":
                fusion.cancel_transpose_pairs(program.model)
                fusion.pack_qkv(program.model)
            _rename_axes(program, axes)
            if io_names:
                for value in [*program.model.graph.inputs, *program.model.graph.outputs]:
                    value.name = io_names.get(value.name, value.name)
                axes = {io_names.get(k, k): v for k, v in axes.items()}
            if lifted is not None:
                swappable_export.add_defaults(program, lifted)
                axes = {k: v for k, v in axes.items() if k not in lifted.defaults}
            if _packed_base is not None:
                _packed_base[1](program)  # base MatMuls -> MatMulNBits over lazily quantized weights
        seconds["export"] = time.perf_counter() - t

        meta = _model.metadata(model)
        meta.update(
            {
                "graphadapt.dtype": DTYPE_NAMES[tdtype],
                MERGED_KEY: "true" if merged else "false",
                **({"graphadapt.optimize": optimize} if optimize else {}),
                "graphadapt.dynamic_axes": json.dumps(axes, sort_keys=True),
            }
        )
        program.model.metadata_props.update(meta)
        if external_data is None:
            external_data = _initializer_bytes(program) > EXTERNAL_DATA_THRESHOLD

        # SIGTERM becomes an exception here, so the finally removes the temp dir as for Ctrl-C
        with signals_as_exceptions():
            tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            try:
                # Same file name inside the temp dir: the graph references its weights as
                # "<name>.data", so the pair moves into place without rewriting that reference.
                tmp = tmpdir / path.name
                t = time.perf_counter()
                with memory.phase("save"):
                    _save(program, tmp, external_data)
                    _drop_weights(program)
                    del program  # the saved file is the truth from here on; free the in-memory copy
                    release_memory()
                seconds["save"] = time.perf_counter() - t

                t = time.perf_counter()
                with memory.phase("check"):
                    _check(tmp)
                seconds["check"] = time.perf_counter() - t
                fused: dict[str, int] = {}
                if optimize == "ort":
                    t = time.perf_counter()
                    with memory.phase("optimize"):
                        # not re-checked with onnx.checker: onnxruntime's fused ops are not ONNX ops (its
                        # SimplifiedLayerNormalization even sits in the default domain); onnxruntime loads
                        # and verifies the file next
                        fused = fusion.run_ort_optimizer(tmp, external_data)
                    seconds["optimize"] = time.perf_counter() - t
                report = _describe(tmp, path, tdtype, axes, meta, merged, external_data)
                report.optimize, report.fused_ops = optimize, fused
                if opset is not None and report.opset != opset:
                    raise ExportError(f"asked for opset {opset} but the exporter produced opset {report.opset} "
                                      f"(its version conversion failed); use opset={report.opset} or leave it unset")

                if verify:
                    t = time.perf_counter()
                    atol_, rtol_ = DEFAULT_TOLERANCES[tdtype]
                    # verify_onnx takes the reference from the box, runs it, and drops it before
                    # onnxruntime loads the file: the two copies of the weights never coexist
                    # (a lazily merged copy holds placeholders: the reference is then made from ``model``)
                    # (a swappable export's reference is the model itself, not the copy with lifted slots)
                    box = [None if getattr(export_model, "graphadapt_lazy_folds", None) or lifted is not None
                           else export_model]
                    # hollow base: the reference reads each weight from the checkpoint (quantize= verifies itself)
                    if source is not None and _packed_base is None:
                        from graphadapt.outofcore import StreamedReference

                        box = [StreamedReference(model, source)]
                    del export_model
                    release_memory()
                    with memory.phase("verify"):
                        result = verify_fn(tmp, box.pop()) if verify_fn is not None else verify_onnx(
                            tmp,
                            model,
                            example_inputs=inputs,
                            dtype=tdtype,
                            providers=providers,
                            atol=atol_ if atol is None else atol,
                            rtol=rtol_ if rtol is None else rtol,
                            reference=box.pop,
                            rms_tol=rms_tol,
                            part_bytes=verify_part_bytes,
                        )
                    seconds["verify"] = time.perf_counter() - t
                    report.verified = True
                    report.max_abs_diff, report.max_rel_diff = result.max_abs_diff, result.max_rel_diff
                    report.atol, report.rtol = result.atol, result.rtol
                    # a custom verify_fn (decoder greedy decode) may not measure RMS
                    report.rel_rms_diff = getattr(result, "rel_rms_diff", report.rel_rms_diff)
                    report.rms_tol = getattr(result, "rms_tol", report.rms_tol)
                    report.providers, report.verify_input_shapes = result.providers, result.input_shapes
                    report.reference_dtype = result.reference_dtype
                    report.verify_parts = getattr(result, "parts", 1)
                    report.noise_floor = getattr(result, "noise_floor", {})

                t = time.perf_counter()
                try:
                    _commit(tmp, path, external_data)
                except OSError as e:
                    raise ExportError(f"moving the checked model to {path} failed ({e}); {path} is unchanged") from e
                seconds["commit"] = time.perf_counter() - t
            except VerificationError as e:
                e.args = (f"{e.args[0] if e.args else e} Nothing was written to {path}.", *e.args[1:])
                raise
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
    report.rss_start, report.peak_rss = memory.start, dict(memory.peaks)
    seconds["total"] = time.perf_counter() - t_start
    report.seconds = seconds
    return report


def _check_opset(opset) -> None:
    """Refuse an opset the exporter cannot write, before any work."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset must be an integer from {MIN_OPSET} to {newest} (this onnx), got {opset!r}; "
                          "leave it unset for torch's recommended opset")


def _weight_source(model, weights_from, tdtype, swappable: bool, verify_fn):
    """The out-of-core weight source of a hollow model (None for a model holding its weights)."""
    from graphadapt.errors import CheckpointError
    from graphadapt.outofcore import weight_source

    try:
        source = weight_source(model, weights_from)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if source is None:
        return None
    if swappable or verify_fn is not None:
        raise ExportError("an out-of-core export (base weights read from a checkpoint) supports neither swappable=True "
                          "nor a custom verify_fn yet")
    dtypes = {source.checkpoint.entries[n].dtype for n in source.hollow}
    if dtypes - {tdtype}:
        raise ExportError(f"an out-of-core export writes the checkpoint's tensors as they are: export in "
                          f"{sorted(DTYPE_NAMES.get(d, str(d)) for d in dtypes)} (dtype=...), not {DTYPE_NAMES[tdtype]}")
    return source


def _prepare(model, inputs, tdtype, merge: bool, lazy: bool = False, weights_from=None):
    """(model to export, its inputs, output names): converted (and merged) copy, one forward to name outputs
    (with ``lazy`` the merged weights are placeholders: the forward runs, its values are not used)."""
    try:
        export_model = converted_copy(model, tdtype, inputs, merge=merge, lazy_merge=lazy, weights_from=weights_from)
    except ExportError:
        raise
    except MergeError as e:
        raise ExportError(f"merging adapters before export failed ({_model.one_line(e)}); pass merge=False") from e
    except Exception as e:
        raise ExportError(
            f"could not convert {type(model).__name__} to {DTYPE_NAMES[tdtype]}: {_model.one_line(e)}; "
            "export in fp32 or convert the model before capture"
        ) from e
    export_inputs = cast_inputs(inputs, tdtype)
    try:  # over a hollow base the copy holds placeholders: this forward only names the outputs
        with torch.no_grad(), (placeholders_ok() if weights_from is not None else contextlib.nullcontext()):
            outputs = export_model(**export_inputs)
    except Exception as e:
        raise ExportError(
            f"{type(model).__name__} fails on its example inputs {_shapes(export_inputs)}: {_model.one_line(e)}"
        ) from e
    if not _model.flat_tensors(outputs):
        raise ExportError(f"{type(model).__name__} returned no tensors ({type(outputs).__name__}); nothing to export")
    return export_model, export_inputs, _model.output_names(outputs)


def _torch_onnx_export(model, inputs, axes, names, opset, optimize=None):
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" noise
    try:
        # Fake-tensor SDPA strides differ between torch.onnx's decomposition and its
        # type-promotion pass unless the backend is pinned; T5 then fails with "Cannot view
        # a tensor ...". Pinning MATH only affects tracing: SDPA still becomes ONNX attention ops.
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                model,
                (),
                kwargs=inputs,
                dynamo=True,
                dynamic_shapes=_model.export_dynamic_shapes(inputs, axes),
                input_names=[k for k, v in inputs.items() if isinstance(v, torch.Tensor)],
                output_names=names,
                opset_version=opset,
                optimize=True,
                verbose=False,
                custom_translation_table=fusion.translation_table(optimize),
            )
    except Exception as e:
        if isinstance(_model.root_cause(e), ExportError):  # raised by a custom translation (optimize=)
            raise _model.root_cause(e) from e
        raise ExportError(_export_failure_message(model, inputs, e)) from e
    finally:
        registration_log.setLevel(level)
    outs = [v.name for v in program.model.graph.outputs]
    if len(outs) != len(names):
        warnings.warn(f"ONNX graph has outputs {outs}, expected {names}; kept the exporter's names", stacklevel=3)
    return program


def _install_lazy_folds(program, export_model) -> bool:
    """Put each placeholder weight's fold behind the ONNX initializers that read it, to be
    computed when the file is written (one weight at a time).

    An initializer reads a placeholder when its data lies inside the placeholder's memory: the
    placeholder itself, or a view of it (torch.onnx's optimizer transposes weights for MatMul
    as numpy views). Its replacement computes the merged weight and takes the same view of it.
    Returns False (nothing changed) when some placeholder is read by no initializer — the
    exporter consumed it in a way not covered here — and the caller exports from real values."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    folds = getattr(export_model, "graphadapt_lazy_folds", None)
    if not folds:
        return True
    spans = sorted((f.placeholder.data_ptr(), f.placeholder.data_ptr() + f.placeholder.nbytes, f)
                   for f in folds.values())
    starts = [s for s, _, _ in spans]
    found: list[tuple[Any, Any, Any]] = []
    seen: set[str] = set()
    from graphadapt.exporters.dtype import lazy_min_elements

    limit = lazy_min_elements()
    for value in program.model.graph.initializers.values():
        const = value.const_value
        raw = getattr(const, "raw", None)
        if isinstance(raw, np.ndarray) and raw.base is None and limit is not None and raw.size > limit:
            return False  # a large constant the exporter computed: it might derive from a placeholder
        view = _buffer_view(const)
        if view is None:
            continue
        ptr, itemsize, shape, strides = view
        k = bisect.bisect_right(starts, ptr) - 1
        if k < 0 or not ptr < spans[k][1]:
            continue
        fold = spans[k][2]
        start = fold.placeholder.data_ptr()
        if itemsize != fold.placeholder.element_size() or (ptr - start) % itemsize:
            return False
        found.append((value, fold, (shape, strides, (ptr - start) // itemsize)))
        seen.add(fold.name)
    if seen != set(folds):
        return False
    for value, fold, (shape, strides, offset) in found:
        const = value.const_value

        def compute(fold=fold, shape=shape, strides=strides, offset=offset, name=value.name):
            merged = fold.value()
            return TorchTensor(merged.as_strided(shape, strides, offset).contiguous(), name=name)

        value.const_value = ir.LazyTensor(compute, dtype=const.dtype, shape=const.shape, name=value.name)
    return True


def _buffer_view(const) -> tuple[int, int, tuple[int, ...], tuple[int, ...]] | None:
    """(data address, item size, shape, strides in items) of an initializer backed by a torch
    tensor or a numpy array; None for anything else (lazy or computed-on-demand tensors)."""
    raw = getattr(const, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.data_ptr(), raw.element_size(), tuple(raw.shape), tuple(raw.stride())
    if isinstance(raw, np.ndarray):
        item = raw.itemsize
        if any(st % item for st in raw.strides):
            return None
        return raw.__array_interface__["data"][0], item, tuple(raw.shape), tuple(st // item for st in raw.strides)
    return None


def _rename_axes(program, axes: dict[str, dict[int, str]]) -> None:
    """Give symbolic dims the names in ``axes`` ("batch", "sequence"): the exporter calls them s0, s1 ...

    Done here rather than by passing names to torch.onnx.export, whose renaming assumes every
    kwarg is a graph input and silently skips renaming when a constant kwarg (use_cache=False) is present.
    """
    mapping: dict[str, str] = {}
    for value in program.model.graph.inputs:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.shape[axis] if value.shape is not None and axis < len(value.shape) else None
            sym = getattr(dim, "value", None)  # onnx_ir.SymbolicDim; static dims are ints
            if isinstance(sym, str) and sym not in mapping:
                mapping[sym] = name
    if mapping:
        program.rename_axes(mapping)


def _export_failure_message(model, inputs, e: BaseException) -> str:
    cause = _model.root_cause(e)
    text = str(cause)
    hint = "run torch.export.export(model, (), inputs, strict=False) to see the full error"
    if "Constraints violated" in text or "specialized" in text.lower() or "specialize" in text.lower():
        hint = (
            "an axis declared dynamic was specialised to its example size; capture the model with dynamic "
            "batch/sequence dims (torch.export.Dim.DYNAMIC), give larger example inputs, or pass dynamic=False"
        )
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:2]
        detail = f"{type(cause).__name__}: " + " ".join(lines)[:400]
    else:
        detail = _model.one_line(cause, limit=400)
        if "data-dependent" in text or "DataDependent" in type(cause).__name__ or "GuardOnDataDependent" in text:
            hint = "the forward branches on tensor values; rewrite that branch with torch.where/torch.cond"
    return (
        f"torch.onnx.export could not export {type(model).__name__} with inputs {_shapes(inputs)}: {detail}. "
        f"Hint: {hint}."
    )


def _shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in inputs.items()}


def _initializer_bytes(program) -> int:
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def _save(program, tmp: Path, external_data: bool) -> None:
    try:
        # ONNXProgram.save names the weights file f"{tmp.name}.data" next to tmp.
        program.save(str(tmp), external_data=external_data)
    except Exception as e:
        raise ExportError(f"writing {tmp.name} failed: {_model.one_line(e)}") from e


def _drop_weights(program) -> None:
    """Unhook the export model's tensors from the in-memory ONNX graph once it is saved.

    onnxscript's rewrite-rule matchers (module-level objects) keep a reference to the last
    graph they matched, so the graph — and through its initializers every weight of the
    export copy — would outlive ``program``; verification then held two copies of the weights."""
    graph = program.model.graph
    values = [*graph.initializers.values(), *graph.inputs]
    for node in graph.all_nodes():
        values += [v for v in node.inputs if v is not None]
    for value in values:
        if value.const_value is not None:
            value.const_value = None
    from ._matchers import release_rewriter_graphs  # they may hold an intermediate graph of the optimizer

    release_rewriter_graphs()


def _check(tmp: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(tmp))  # by path: loads external data lazily, works past 2 GB
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {_model.one_line(e, limit=500)}") from e


def _describe(tmp: Path, final: Path, tdtype, axes, meta, merged, external_data) -> ExportReport:
    import onnx

    proto = onnx.load(str(tmp), load_external_data=False)
    histogram = collections.Counter()
    for node in _all_nodes(proto.graph):
        histogram[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    dims: dict[str, dict[int, str]] = {}
    for v in [*proto.graph.input, *proto.graph.output]:
        sym = {i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.HasField("dim_param")}
        if sym:
            dims[v.name] = sym
    data = tmp.with_name(tmp.name + ".data")
    size = tmp.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return ExportReport(
        path=final,
        dtype=DTYPE_NAMES[tdtype],
        opset=opset,
        input_names=[v.name for v in proto.graph.input],
        output_names=[v.name for v in proto.graph.output],
        dynamic_axes=dims,
        node_count=sum(histogram.values()),
        op_histogram=dict(histogram.most_common()),
        file_size=size,
        external_data=final.with_name(final.name + ".data") if data.exists() else None,
        merged=merged,
        metadata=meta,
    )


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _commit(tmp: Path, path: Path, external_data: bool) -> None:
    """Move the checked pair into place; on failure the earlier pair is restored."""
    tmp_data = tmp.with_name(tmp.name + ".data")
    final_data = path.with_name(path.name + ".data")
    if not tmp_data.exists():
        os.replace(tmp, path)
        return
    # Two renames cannot be one atomic step: park the old weights in the temp dir so a
    # failure between the renames can put them back.
    backup = tmp.with_name(tmp.name + ".old-data")
    had_old = final_data.exists()
    if had_old:
        os.replace(final_data, backup)
    try:
        os.replace(tmp_data, final_data)
        os.replace(tmp, path)
    except BaseException:
        if had_old:
            os.replace(backup, final_data)
        else:
            final_data.unlink(missing_ok=True)
        raise
