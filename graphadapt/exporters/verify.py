"""Check an ONNX file against PyTorch with onnxruntime, on shapes the export never saw.

``(model.onnx, model) → VerifyResult`` or :class:`~graphadapt.errors.VerificationError`.

Fresh inputs take every symbolic ONNX dimension to a new size (``batch`` +1, other
axes +3, capped at the model's position limit), so a graph that silently
specialised an axis at export fails here rather than in serving. The PyTorch
reference runs in the export dtype (a converted copy, see :mod:`.dtype`); if torch
lacks a kernel for that dtype on the model's device, the reference falls back to
fp32 and the result records ``reference_dtype="fp32"`` (the dtype tolerance then
also absorbs rounding of the weights).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from graphadapt.capture import serialised
from graphadapt.composition.route import ROUTE_INPUT, TASK_INPUT
from graphadapt.errors import ExportError, VerificationError
from graphadapt.exporters import _model
from graphadapt.exporters.dtype import DTYPE_NAMES, cast_inputs, converted_copy, parse_dtype

# (atol, rtol). Worst max-abs diffs measured on the tiny BERT/GPT-2/Llama/T5/ViT test models
# (docs/export.md): fp32 1.3e-6, fp16 3.9e-3 (against torch fp16; 2.0e-3 against fp32).
# Defaults leave ~80x (fp32) and ~8x (fp16) headroom for deeper models. bf16 cannot run on
# onnxruntime's CPU provider; torch bf16 vs fp32 differs by <= 2.3e-2 here, so ~4x headroom.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-2, 3e-2),
    torch.bfloat16: (1e-1, 1e-1),
}

# Systematic-error gate: RMS of (onnx - torch) over RMS of torch, per output. Rounding noise is
# small on average while a wrong adapter shifts every element, so this separates the two where
# the per-element (atol, rtol) bound cannot: on tiny BERT with LoRA + SeqBn, fp16 rounding gives
# 0.0007-0.0009 while adapter weights off by 3% give 0.0045 and by 5% 0.0074 (max abs diff 0.038,
# inside fp16's atol) — docs/reliability.md. fp16 noise on the five tiny test models is at most
# 1.1e-3 (BERT pooler): 3.6x headroom.
DEFAULT_RMS_TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

# A low-precision file may differ from the exact result by this many times PyTorch's own error
# in that dtype (see compare()); measured on a 7B-geometry Llama, 8 layers, fp16: onnxruntime was
# 0.73x (RMS) and 0.80x (max) as far from the fp32-compute result as PyTorch fp16 was.
NOISE_FACTOR = 2.0

# fp32 files: how far a correct fp32 implementation may land from PyTorch's fp32 result depends on
# the model's conditioning, not only on the dtype. Measured (tiny T5, LoRA std 0.5, greedy logits
# of magnitude ~2.5): PyTorch's own fp32 logits moved by 7.7e-4 between ATen's AVX-512 and
# default kernels, onnxruntime differed from PyTorch by 3.9e-4 — a fixed atol of 1e-4 held on one
# CPU and failed on another. So the fp32 reference is also run with every op result perturbed by
# up to JITTER_ULPS units of fp32 rounding (:class:`RoundingJitter`, JITTER_SEEDS runs); the spread
# this causes, times NOISE_FACTOR, is the per-output floor under both bounds. Well-conditioned
# models get floors far below atol (the usual 1e-4 decides); adapter-sized differences stay
# orders of magnitude above any floor (tests/test_verify_noise.py).
JITTER_ULPS = 2.0
JITTER_SEEDS = (0, 1)

_ONNX_TO_TORCH = {
    1: torch.float32,
    10: torch.float16,
    16: torch.bfloat16,
    11: torch.float64,
    7: torch.int64,
    6: torch.int32,
    9: torch.bool,
    2: torch.uint8,
    3: torch.int8,
}


@dataclass
class VerifyResult:
    """What a verification run compared and found."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0
    rel_rms_diff: dict[str, float] = field(default_factory=dict)
    rms_tol: float | None = None
    providers: list[str] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reference_dtype: str = "fp32"
    seconds: float = 0.0
    parts: int = 1  # onnxruntime sessions the graph ran in (see run_onnxruntime)
    # per output: low precision: max |PyTorch in the dtype - PyTorch computing in fp32 on the same
    # weights|; fp32: max spread of PyTorch's result under rounding jitter. Bounds rise to
    # NOISE_FACTOR times this where that exceeds atol/rtol (see compare()).
    noise_floor: dict[str, float] = field(default_factory=dict)


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def verification_providers(providers) -> list:
    """``providers`` (default :func:`default_providers`) with TF32 off on the CUDA EP.

    onnxruntime's CUDA EP runs fp32 matrix products in TF32 by default (10-bit mantissa on
    Ampere and later), PyTorch does not (``torch.backends.cuda.matmul.allow_tf32`` is False): an
    exact fp32 export then differs by ~1e-3. Verification checks the export, so it turns TF32
    off unless the caller gives the CUDA EP as ``("CUDAExecutionProvider", {options})``
    (their options are kept as they are). Measured on an H200: a BERT differed by 1.4e-3
    with TF32, within 1e-4 without.
    """
    out = []
    for p in list(providers or default_providers()):
        if p == "CUDAExecutionProvider":
            p = ("CUDAExecutionProvider", {"use_tf32": "0"})
        out.append(p)
    return out


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        if _interrupted(e):  # Ctrl-C while a C extension loaded surfaces as ImportError: keep it Ctrl-C
            raise KeyboardInterrupt from e
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "onnxruntime":
            raise ExportError(
                "verification needs onnxruntime: pip install 'graphadapt[ort]' (or [gpu]), or pass verify=False"
            ) from e
        raise ExportError(f"onnxruntime is installed but failed to import ({_model.one_line(e)}); "
                          "reinstall it, or pass verify=False") from e
    return ort


def _interrupted(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def check_onnx_file(path: str | Path) -> None:
    """:class:`ExportError` unless ``path`` is a readable ONNX model file (cheap: graph only, no weights)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"no ONNX file at {p}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, OSError ...
        raise ExportError(f"{p} is not a readable ONNX model ({_model.one_line(e)})") from e
    if not proto.graph.node and not proto.graph.output:
        raise ExportError(f"{p} is not an ONNX model (no graph); give the .onnx file written by export")


def graph_io(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Required inputs and outputs of an ONNX file as ``{"name", "elem_type", "dims"}`` (dims: int, str or
    None); inputs with a default (an initializer of the same name) are left out."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                for d in t.shape.dim
            ]
            out.append({"name": v.name, "elem_type": t.elem_type, "dims": dims})
        return out

    # an input with an initializer of its name has a default (a swappable adapter tensor): not required
    defaults = {t.name for t in proto.graph.initializer}
    return describe([v for v in proto.graph.input if v.name not in defaults]), describe(proto.graph.output)


def onnx_float_dtype(path: str | Path) -> torch.dtype:
    """The float dtype an exported file computes in (from its metadata, else its float inputs/outputs)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "graphadapt.dtype" in meta:
        return parse_dtype(meta["graphadapt.dtype"])
    ins, outs = graph_io(path)
    for v in [*ins, *outs]:
        dt = _ONNX_TO_TORCH.get(v["elem_type"])
        if dt in DTYPE_NAMES:
            return dt
    return torch.float32


def fresh_inputs(
    path: str | Path,
    example: dict[str, Any],
    model: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs for every graph input with each symbolic axis resized (``batch`` +1, others +3).

    Token ids are drawn from ``[0, config.vocab_size)`` (else below the example's max + 1);
    masks are ones with ``i`` zeros of right padding on row ``i``; floats are ``randn``.
    """
    g = torch.Generator().manual_seed(seed)
    ins, _ = graph_io(path)
    config = getattr(model, "config", None) if model is not None else None
    max_pos = _max_positions(config)
    sizes: dict[str, int] = {}
    for v in ins:  # one new size per symbol, so axes that share a name stay equal
        ex = example.get(v["name"])
        for axis, d in enumerate(v["dims"]):
            if isinstance(d, str) and d not in sizes:
                base = ex.shape[axis] if isinstance(ex, torch.Tensor) and ex.dim() > axis else (2 if axis == 0 else 8)
                new = base + (1 if axis == 0 or "batch" in d else 3)
                if axis > 0 and max_pos and new > max_pos:
                    new = max(base - 1, 1) if base >= max_pos else max_pos
                sizes[d] = new
    out: dict[str, torch.Tensor] = {}
    for v in ins:
        name, ex = v["name"], example.get(v["name"])
        shape = []
        for axis, d in enumerate(v["dims"]):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str):
                shape.append(sizes[d])
            else:
                shape.append(ex.shape[axis] if isinstance(ex, torch.Tensor) else 1)
        tdtype = _ONNX_TO_TORCH.get(v["elem_type"], torch.float32)
        out[name] = _make_input(name, tuple(shape), tdtype, ex, config, g)
    return cast_inputs(out, dtype) if dtype != torch.float32 else out


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _make_input(name, shape, dtype, example, config, g) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    lname = name.lower()
    if "mask" in lname:
        mask = torch.ones(shape, dtype=dtype)
        if len(shape) >= 2:
            for row in range(1, shape[0]):  # right padding, never a fully masked row
                pad = min(row, shape[-1] - 1)
                if pad:
                    mask[row, ..., shape[-1] - pad :] = 0
        return mask
    if "token_type" in lname:  # sentence pairs: segment 0 then 1, where the model has two token types
        segments = torch.zeros(shape, dtype=dtype)
        if isinstance(getattr(config, "type_vocab_size", None), int) and config.type_vocab_size > 1 and shape:
            segments[..., shape[-1] // 2:] = 1
        return segments
    if name == ROUTE_INPUT and len(shape) == 1:  # Route: every id in the example's range, -1 (base model) included
        top = int(example.max()) + 1 if isinstance(example, torch.Tensor) and example.numel() else 1
        return (torch.arange(shape[0], dtype=torch.int64) % (top + 1) - 1).to(dtype)
    if name == TASK_INPUT and len(shape) == 1:  # MultiTask: every task id in the example's range (no base id)
        top = int(example.max()) + 1 if isinstance(example, torch.Tensor) and example.numel() else 1
        return (torch.arange(shape[0], dtype=torch.int64) % top).to(dtype)
    if "position_ids" in lname and len(shape) >= 1:
        return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
    high = getattr(config, "vocab_size", None) if "ids" in lname else None
    if not isinstance(high, int) or high <= 0:
        high = int(example.max()) + 1 if isinstance(example, torch.Tensor) and example.numel() else 2
    return torch.randint(0, high, shape, generator=g, dtype=torch.int64).to(dtype)


def run_onnxruntime(
    path: str | Path, inputs: dict[str, torch.Tensor], providers: list[str] | None = None,
    part_bytes: int | None = None, *, stats: dict | None = None,
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Run ``path`` on ``inputs``; returns (outputs, output names, providers actually used).

    Files with more than :data:`~graphadapt.exporters._parts.PARTS_ABOVE` bytes of weights run
    in consecutive parts (:mod:`graphadapt.exporters._parts`), each reading at most
    ``part_bytes`` of them (default an eighth of the weights), so the session never holds all
    the weights and their fp32 casts at once; ``part_bytes`` also forces parts on a small file.
    ``stats`` (a dict) receives ``"parts"``, the number of sessions run.
    """
    import onnx

    from graphadapt.exporters import _parts

    ort = import_ort()
    providers = verification_providers(providers)
    folder = str(Path(path).resolve().parent)

    def session(model):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no arena, no memory-pattern planning, no pre-packed weight copies: verification
        # runs a few inputs once, and these would hold extra copies of the weights
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
        if isinstance(model, bytes):  # a part: its external data lies beside the file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(model, opts, providers=providers)

    proto = onnx.load(str(path), load_external_data=False)
    budget = part_bytes if part_bytes is not None else _parts.default_budget(proto.graph)
    split = budget is not None and _parts.can_split(proto)
    try:
        if split:
            feeds = {name: _to_numpy(inputs[name]) for name in _parts.graph_inputs(proto)}
            outputs, names, used, count = _parts.run_in_parts(proto, feeds, budget, session)
            if stats is not None:
                stats["parts"] = count
            return outputs, names, used
        del proto
        sess = session(str(path))
        feeds = {i.name: _to_numpy(inputs[i.name]) for i in sess.get_inputs()}
        outputs = sess.run(None, feeds)
    except KeyError as e:
        raise VerificationError(f"the ONNX graph needs input {e} that was not supplied") from e
    except VerificationError:
        raise
    except Exception as e:
        raise VerificationError(
            f"onnxruntime could not run {Path(path).name} with {providers}: {_model.one_line(e)}. "
            "If the provider lacks kernels for this dtype (bf16 on CPU), verify on a GPU provider "
            "(providers=['CUDAExecutionProvider']) or pass verify=False."
        ) from e
    if stats is not None:
        stats["parts"] = 1
    return outputs, [o.name for o in sess.get_outputs()], sess.get_providers()


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise VerificationError(
            "onnxruntime's Python API takes numpy arrays, which have no bfloat16: a bf16 model with "
            "float inputs (pixel_values) cannot be verified here; pass verify=False"
        )
    return t.numpy()


def compare(
    names: list[str],
    reference: list[torch.Tensor],
    actual: list[np.ndarray],
    atol: float,
    rtol: float,
    context: str = "",
    rms_tol: float | None = None,
    rel_rms: dict[str, float] | None = None,
    noise: list[torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Max abs / rel diff per output; raises VerificationError past ``|a - r| <= atol + rtol·|r|``.

    The relative diff is ``|a - r| / (|r| + atol)`` so near-zero entries do not dominate it.
    With ``rms_tol``, also fails when ``rms(a - r) > rms_tol · max(rms(r), atol)`` (a systematic
    difference such as other adapter weights); ``rel_rms`` (a dict) receives that ratio per output.
    ``noise`` (per output: PyTorch's own low-precision result minus ``reference``) raises both
    bounds to :data:`NOISE_FACTOR` times PyTorch's own error where that is larger: the file
    may be as far from the exact result as PyTorch in the same dtype is, times that factor.
    """
    if len(reference) != len(actual):
        raise VerificationError(
            f"ONNX graph has {len(actual)} outputs {names} but PyTorch returned {len(reference)} tensors{context}"
        )
    max_abs, max_rel, failures = {}, {}, []
    for i, (name, ref, got) in enumerate(zip(names, reference, actual)):
        r = ref.detach().cpu().to(torch.float64).numpy()
        a = np.asarray(got).astype(np.float64)
        floor_abs = floor_rms = 0.0
        if noise is not None and noise[i] is not None and noise[i].numel():
            n = np.nan_to_num(noise[i].detach().cpu().to(torch.float64).numpy())
            floor_abs = NOISE_FACTOR * float(np.abs(n).max())
            floor_rms = NOISE_FACTOR * float(np.sqrt(np.mean(n**2)))
        if r.shape != a.shape:
            raise VerificationError(
                f"output '{name}' has shape {a.shape} in onnxruntime but {r.shape} in PyTorch{context}"
            )
        if r.size == 0:
            max_abs[name] = max_rel[name] = 0.0
            continue
        both_nan = np.isnan(r) & np.isnan(a)
        diff = np.where(both_nan, 0.0, np.abs(a - r))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is a failure
        rel = diff / (np.abs(np.nan_to_num(r)) + atol)
        max_abs[name], max_rel[name] = float(diff.max()), float(rel.max())
        bad = diff > np.maximum(atol + rtol * np.abs(np.nan_to_num(r)), floor_abs)
        scale = max(float(np.sqrt(np.mean(np.nan_to_num(r) ** 2))), atol)
        ratio = float(np.sqrt(np.mean(diff**2)) / scale)
        if rel_rms is not None:
            rel_rms[name] = ratio
        limit = None if rms_tol is None else max(rms_tol, floor_rms / scale)
        if limit is not None and not bad.any() and not ratio <= limit:
            failures.append(
                f"'{name}': every element is within atol/rtol but the RMS difference is {ratio:.3g} of the "
                f"output's RMS (limit {limit:.3g}): a systematic difference (other weights or adapters?), "
                "not rounding"
            )
        if bad.any():
            idx = np.unravel_index(int(np.argmax(np.where(bad, diff, -1))), r.shape)
            failures.append(
                f"'{name}': max abs diff {max_abs[name]:.3g}, max rel diff {max_rel[name]:.3g}, "
                f"{int(bad.sum())}/{bad.size} elements out of tolerance "
                f"(worst at {tuple(int(i) for i in idx)}: onnx {a[idx]:.6g} vs torch {r[idx]:.6g})"
            )
    if failures:
        raise VerificationError(
            f"ONNX output disagrees with PyTorch beyond atol={atol:g}, rtol={rtol:g}{context}: "
            + "; ".join(failures)
            + ". If the difference is expected (low precision), pass looser atol=/rtol=."
        )
    return max_abs, max_rel


class _Upcast(TorchDispatchMode):
    """Run a low-precision model's ops in fp32: every ``low`` tensor argument is upcast just for
    its op (weights one at a time, then freed) and every ``dtype=low`` becomes fp32, so the
    result is the model's computation with its own (rounded) weights but without low-precision
    arithmetic. Measured: identical (0.0) to the fp32 model holding the same weights."""

    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low

    def _up(self, x):
        if isinstance(x, torch.Tensor) and x.dtype == self.low:
            return x.float()
        if isinstance(x, torch.dtype) and x == self.low:
            return torch.float32
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.view.dtype:  # a bit reinterpretation: leave it alone
            return func(*args, **kwargs)
        return func(*tree_map(self._up, args), **tree_map(self._up, kwargs))


class RoundingJitter(TorchDispatchMode):
    """Perturb every floating-point result that is a new tensor (not a view, not an in-place
    write) by a uniform relative error of at most ``ulps`` units of its dtype's epsilon, drawn
    from a private seeded generator: a stand-in for another kernel's accumulation order."""

    def __init__(self, seed: int, ulps: float = JITTER_ULPS):
        super().__init__()
        self.ulps = ulps
        self.generators: dict[torch.device, torch.Generator] = {}
        self.seed = seed

    def _jitter(self, t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            return t
        g = self.generators.get(t.device)
        if g is None:
            g = self.generators[t.device] = torch.Generator(device=t.device).manual_seed(self.seed)
        u = torch.rand(t.shape, generator=g, dtype=t.dtype, device=t.device).mul_(2).sub_(1)
        jittered = t + t * u.mul_(self.ulps * torch.finfo(t.dtype).eps)
        return torch.where(torch.isfinite(jittered), jittered, t)  # ±inf mask fills and overflow stay as they are

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place results keep their aliasing (KV-cache writes go through them)
        return tree_map(self._jitter, out)


def combine_noise(runs: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Per output, the elementwise largest-magnitude difference over several jittered runs."""
    out = list(runs[0])
    for run in runs[1:]:
        for i, n in enumerate(run):
            if n is None:
                continue
            if out[i] is None or n.shape != out[i].shape:
                out[i] = n if out[i] is None else out[i]
                continue
            out[i] = torch.where(n.abs() > out[i].abs(), n, out[i])
    return out


def rounding_noise(ref_model, call_inputs: dict, reference: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """``reference``'s spread under :class:`RoundingJitter` (per output); None if an op refuses."""
    runs = []
    try:
        for seed in JITTER_SEEDS:
            with RoundingJitter(seed):
                out = [t.detach() for t in _model.flat_tensors(ref_model(**call_inputs))]
            runs.append([o.to(r.dtype) - r if o.shape == r.shape else None for o, r in zip(out, reference)])
    except Exception:  # noqa: BLE001 - an op the dispatch mode cannot serve: no floor, plain bounds
        return None
    return combine_noise(runs) if runs and len(runs[0]) == len(reference) else None


def _high_precision_outputs(ref_model, call_inputs: dict, low: torch.dtype) -> list[torch.Tensor] | None:
    """The reference's outputs computed in fp32 (see :class:`_Upcast`); None if a graph op refuses."""
    try:
        with _Upcast(low):
            out = ref_model(**call_inputs)
    except Exception as e:  # noqa: BLE001 - an op the upcast cannot serve: keep the plain reference
        logging.getLogger("graphadapt").warning(
            "verification: the fp32-compute reference failed (%s); comparing with PyTorch %s instead",
            _model.one_line(e), DTYPE_NAMES.get(low, str(low)))
        return None
    return [t.detach().clone() for t in _model.flat_tensors(out)]


@serialised
def verify_onnx(
    path: str | Path,
    model: torch.nn.Module,
    inputs: dict[str, Any] | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    providers: list[str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    reference: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    rms_tol: float | None = None,
    part_bytes: int | None = None,
) -> VerifyResult:
    """Compare the ONNX file at ``path`` with ``model`` on ``inputs`` (default: fresh shapes).

    ``dtype`` defaults to the file's (``graphadapt.dtype`` metadata or its float I/O);
    the PyTorch reference is ``model`` converted to it. ``reference`` skips that
    conversion when the caller already holds the converted model; a function returning it
    lets this drop the model after its forward, before onnxruntime loads the weights.
    Memory: the reference model's forward, then the onnxruntime session (without a CPU
    arena, memory patterns or pre-packed weights, which would copy the weights again).
    ``rms_tol`` bounds the RMS difference relative to the output's RMS (default per dtype,
    :data:`DEFAULT_RMS_TOLERANCES`; ``float("inf")`` disables it).
    ``part_bytes``: run onnxruntime in parts reading at most this many bytes of weights each
    (default: in parts only above 256 MiB of weights; see :func:`run_onnxruntime`).
    """
    start = time.perf_counter()
    path = Path(path)
    check_onnx_file(path)
    tdtype = parse_dtype(dtype) if dtype is not None else onnx_float_dtype(path)
    d_atol, d_rtol = DEFAULT_TOLERANCES[tdtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    rms_tol = DEFAULT_RMS_TOLERANCES[tdtype] if rms_tol is None else rms_tol
    try:
        example = _model.example_inputs(model, example_inputs)
    except ExportError:
        if inputs is None:
            raise
        example = dict(inputs)  # the given inputs double as the example (dtype retargeting needs one)
    if inputs is None:
        inputs = fresh_inputs(path, example, model, tdtype, seed)
    else:
        inputs = cast_inputs(dict(inputs), tdtype)

    constants = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}  # use_cache=False ...
    if reference is not None and not isinstance(reference, torch.nn.Module):
        reference = reference()
    ref_model, ref_dtype = reference, tdtype
    high: list[torch.Tensor] | None = None
    jitter: list[torch.Tensor | None] | None = None
    with _model.inference_mode(model), torch.no_grad():
        if ref_model is None:
            ref_model = converted_copy(model, tdtype, example)
        device = _model.model_device(ref_model)
        try:
            call = {**constants, **{k: v.to(device) for k, v in inputs.items()}}
            ref_out = ref_model(**call)
            if tdtype != torch.float32:
                high = _high_precision_outputs(ref_model, call, tdtype)
            elif ref_dtype == torch.float32:
                jitter = rounding_noise(ref_model, call, [t.detach() for t in _model.flat_tensors(ref_out)])
        except (RuntimeError, NotImplementedError) as e:
            if tdtype == torch.float32 or "not implemented" not in str(e).lower():
                raise VerificationError(f"PyTorch reference failed on the fresh inputs: {_model.one_line(e)}") from e
            # torch lacks a low-precision kernel here: compare against fp32 instead
            ref_dtype = torch.float32
            ref_out = model(
                **constants, **{k: (v.float() if v.is_floating_point() else v).to(device) for k, v in inputs.items()}
            )
    reference_tensors = [t.detach().clone() for t in _model.flat_tensors(ref_out)]
    del ref_model, reference, ref_out
    from graphadapt.exporters._memory import release_memory

    release_memory()

    stats: dict = {}
    outputs, names, used = run_onnxruntime(path, inputs, providers, part_bytes, stats=stats)
    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
    context = f" on inputs {shapes} with {used[0] if used else 'onnxruntime'}"
    rel_rms: dict[str, float] = {}
    noise = None
    if high is not None and len(high) == len(reference_tensors):
        # compare with the fp32-compute result, allowing the file PyTorch's own low-precision error
        noise = [lo.to(hi.dtype) - hi if lo.shape == hi.shape else None for lo, hi in zip(reference_tensors, high)]
        reference_tensors = high
    elif jitter is not None:
        noise = jitter  # fp32: the spread of PyTorch's own result under rounding jitter
    max_abs, max_rel = compare(names, reference_tensors, outputs, atol, rtol, context, rms_tol, rel_rms, noise)
    return VerifyResult(
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        atol=atol,
        rtol=rtol,
        rel_rms_diff=rel_rms,
        rms_tol=rms_tol,
        providers=used,
        input_shapes=shapes,
        reference_dtype=DTYPE_NAMES.get(ref_dtype, str(ref_dtype)) + (" weights, fp32 compute" if high is not None and noise else ""),
        seconds=time.perf_counter() - start,
        parts=stats.get("parts", 1),
        noise_floor={n: float(x.abs().max()) for n, x in zip(names, noise or []) if x is not None and x.numel()},
    )
