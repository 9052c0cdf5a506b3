"""Quantized base weights (bitsandbytes 4-bit NF4/FP4 and 8-bit, torchao) through capture, as ordinary linear sites.

torch.export cannot trace bitsandbytes' ``Linear4bit`` (its 4-bit matmul asserts on fake
tensors), and graphadapt's passes expect a linear site's weight to be a dense ``[out, in]``
parameter. So capture handles any module whose ``weight`` is a bitsandbytes ``Params4bit``
(found by the parameter's type, never by architecture) in two steps:

before export (:func:`opaque_quantized_linears`, a context manager; the caller's model is
restored on exit): the module's packed weight is swapped for a stand-in of the dense shape and
compute dtype that owns no memory (a zero scalar expanded to ``[out, in]``) and its forward for
``linear(x, W, b)`` in the compute dtype, so the captured graph has the plain
``aten.linear(x, get_attr(<path>.weight), b)`` form every pass already understands;

after export (:func:`install_quantized_weights`): the module at ``<path>`` in the captured graph
becomes a :class:`Packed4bitLinear` that holds the packed bytes (sharing storage with the caller's
``Params4bit``; never written) and the quantisation state as buffers, and whose ``weight`` is a
property that dequantizes on every read. The graph's ``get_attr`` of that weight therefore runs
the dequantization inside forward, exactly as bitsandbytes' own CPU matmul does (dequantize, then
a dense matmul in the compute dtype), so outputs match a PEFT model over the same base.

The dense weight exists only transiently (per linear, per call); at rest the base costs the
packed bytes plus the block scales. ``weight`` is not a registered parameter: it is in no
optimizer, no ``state_dict`` and receives no gradient (the input's gradient still flows).

The same route serves bitsandbytes 8-bit (``Int8Params``: :class:`Packed8bitLinear`, ``int8 * SCB / 127``)
and torchao weights that dequantize themselves (:class:`PackedTorchaoLinear`). Also here: the
``quantize=`` pass of :func:`graphadapt.apply` (:func:`quantize_linears`), :func:`base_bytes`, and
:func:`dense_base`, the dequantized stand-in merge and export run over (docs/big-models.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CaptureError

__all__ = ["Packed4bitLinear", "Packed8bitLinear", "PackedTorchaoLinear", "PACKED", "opaque_quantized_linears", "install_quantized_weights", "quantized_modules",
           "has_quantized_weights", "refuse_quantized", "Quantize", "quantize_linears", "base_bytes",
           "dense_base", "dense_source_model", "requantize_linears"]


def _is_bnb(p, cls_name: str) -> bool:
    t = type(p)
    return t.__name__ == cls_name and t.__module__.startswith("bitsandbytes")


def _is_torchao(p) -> bool:
    """A torchao quantized weight (``quantize_(model, Int8WeightOnlyConfig())`` and friends): a tensor
    subclass from torchao that can dequantize itself."""
    return type(p).__module__.startswith("torchao") and callable(getattr(p, "dequantize", None)) and p.dim() == 2


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every module whose own ``weight`` is a bitsandbytes 4-bit or 8-bit parameter."""
    out = []
    for path, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None and (_is_bnb(w, "Params4bit") or _is_bnb(w, "Int8Params") or _is_torchao(w)):
            out.append((path, m))
    return out


@dataclass
class _Saved:
    module: nn.Module
    weight: nn.Parameter
    own_forward: object  # the instance's own ``forward`` (None: the class's)


def _compute_dtype(m: nn.Module, qs) -> torch.dtype:
    cd = getattr(m, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) else qs.dtype


def _standin_forward(m: nn.Module, dtype: torch.dtype):
    def forward(x, *args, **kwargs):
        b = m.bias
        xc = x if x.dtype == dtype else x.to(dtype)
        if b is not None and b.dtype != dtype:
            b = b.to(dtype)
        y = F.linear(xc, m.weight, b)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    return forward


@contextlib.contextmanager
def opaque_quantized_linears(model: nn.Module) -> Iterator[dict[str, dict]]:
    """For the duration of the block, every bitsandbytes 4-bit linear in ``model`` computes
    ``linear(x, W, b)`` on a memory-free dense stand-in ``W`` (see the module docstring).

    Yields ``{path: facts}`` for :func:`install_quantized_weights`. The caller's modules, their
    packed ``Params4bit`` objects and forwards are restored on exit, whatever happens.
    """
    found = quantized_modules(model)
    if not found:
        yield {}
        return
    check_supported(found)
    saved: list[_Saved] = []
    facts: dict[str, dict] = {}
    try:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        act_dtype = floats[0] if floats else torch.float32  # 8-bit linears compute in their input's dtype
        for path, m in found:
            w = m._parameters["weight"]
            if _is_torchao(w):
                cd, (out_f, in_f) = w.dtype, (int(s) for s in w.shape)
                facts[path] = {"torchao": w, "compute_dtype": cd}
            elif _is_bnb(w, "Int8Params"):
                cd, (out_f, in_f) = act_dtype, (int(s) for s in w.shape)
                facts[path] = {"int8": w.data, "scb": w.SCB, "compute_dtype": cd}
            else:
                packed, qs = w.data, w.quant_state
                cd = _compute_dtype(m, qs)
                out_f, in_f = (int(s) for s in qs.shape)
                facts[path] = {"packed": packed, "quant_state": qs, "compute_dtype": cd}
            saved.append(_Saved(m, w, m.__dict__.get("forward")))
            standin = torch.zeros((), dtype=cd, device=w.device).expand(out_f, in_f)
            m._parameters["weight"] = nn.Parameter(standin, requires_grad=False)
            m.forward = _standin_forward(m, cd)
        yield facts
    finally:
        for s in reversed(saved):
            s.module._parameters["weight"] = s.weight
            if s.own_forward is None:
                s.module.__dict__.pop("forward", None)
            else:
                s.module.forward = s.own_forward


def check_supported(found: list[tuple[str, nn.Module]]) -> None:
    for path, m in found:
        if _is_torchao(m._parameters["weight"]):
            continue
        if _is_bnb(m._parameters["weight"], "Int8Params"):
            if getattr(m._parameters["weight"], "SCB", None) is None:
                raise CaptureError(f"`{path}` has a bitsandbytes Int8Params weight that is not quantized yet (no SCB): "
                                   "move the model to its device (bitsandbytes quantizes on the move) before apply.")
            continue
        qs = getattr(m._parameters["weight"], "quant_state", None)
        if qs is None:
            raise CaptureError(f"`{path}` has a bitsandbytes Params4bit weight that is not quantized yet (no quant_state): "
                               "move the model to its device (bitsandbytes quantizes on the move) before apply.")
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes' Linear4bit repacks its weight in place at its first eval-mode forward on a CPU
            # with AVX512-BF16 (another byte layout for its bf16 kernel); bitsandbytes' inverse of that
            # repacking does not give back the original values, so capturing it would change the model
            raise CaptureError(
                f"`{path}`: bitsandbytes repacked this 4-bit weight for its CPU inference kernel (an eval-mode "
                "forward of the quantized model ran before graphadapt.apply); the repacked layout is not the "
                "NF4/FP4 layout graphadapt dequantizes. Load the model again and call graphadapt.apply before "
                "running it in eval mode (a train-mode forward does not repack).")
        if getattr(qs, "shape", None) is None or len(qs.shape) != 2:
            raise CaptureError(f"`{path}`: a 4-bit weight of shape {getattr(qs, 'shape', None)} is not a 2-d linear weight.")


class Packed4bitLinear(nn.Module):
    """A captured 4-bit linear's parameters: packed bytes and quantisation state as buffers, and a
    ``weight`` property that dequantizes (to the compute dtype, ``[out, in]``) on each read."""

    def __init__(self, packed: torch.Tensor, quant_state, compute_dtype: torch.dtype, bias: nn.Parameter | None):
        super().__init__()
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_absmax", quant_state.absmax)
        self.register_buffer("weight_code", quant_state.code)
        self.nested = bool(getattr(quant_state, "nested", False))
        if self.nested:
            s2 = quant_state.state2
            self.register_buffer("weight_offset", torch.as_tensor(quant_state.offset))
            self.register_buffer("weight_absmax2", s2.absmax)
            self.register_buffer("weight_code2", s2.code)
            self.blocksize2, self.dtype2 = s2.blocksize, s2.dtype
        self.shape = tuple(int(s) for s in quant_state.shape)
        self.blocksize = quant_state.blocksize
        self.quant_type = quant_state.quant_type
        self.quant_dtype = quant_state.dtype
        self.compute_dtype = compute_dtype
        self.bias = bias
        self.in_features, self.out_features = self.shape[1], self.shape[0]

    def _quant_state(self):
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.weight_absmax2, code=self.weight_code2, blocksize=self.blocksize2,
                                dtype=self.dtype2)
        return QuantState(absmax=self.weight_absmax, shape=torch.Size(self.shape), code=self.weight_code,
                          blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.quant_dtype,
                          offset=self.weight_offset if self.nested else None, state2=state2)

    def dequantize(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight in the compute dtype (a fresh tensor; the packed bytes are only read)."""
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(self.weight_packed, self._quant_state())
        return w if w.dtype == self.compute_dtype else w.to(self.compute_dtype)

    @property
    def weight(self) -> nn.Parameter:  # a frozen, dense view computed on read: never trained, never saved
        return nn.Parameter(self.dequantize(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # device moves apply to everything; a float cast (``.half()``) changes the compute dtype and the
        # bias, never the block scales (casting them would change the dequantized values)
        probe = fn(torch.zeros((), dtype=torch.float32))
        for name, b in list(self._buffers.items()):
            if b is not None:
                self._buffers[name] = b.to(probe.device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=self.bias.requires_grad)
        if probe.dtype != torch.float32:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}"
                f"{' (double quant)' if self.nested else ''}, blocksize={self.blocksize}, "
                f"compute_dtype={self.compute_dtype}")


class Packed8bitLinear(nn.Module):
    """A captured bitsandbytes 8-bit (``Linear8bitLt``) linear: int8 rows and their absmax (``SCB``) as buffers,
    and a ``weight`` property that dequantizes on read, ``int8 * SCB / 127`` in the compute dtype — the
    formula of bitsandbytes' CPU matmul (``MatMul8bitFp``: dequantize, then a dense linear)."""

    quant_type = "int8"
    nested = False

    def __init__(self, int8: torch.Tensor, scb: torch.Tensor, compute_dtype: torch.dtype, bias: nn.Parameter | None):
        super().__init__()
        self.register_buffer("weight_int8", int8)
        self.register_buffer("weight_scb", scb)
        self.compute_dtype = compute_dtype
        self.bias = bias
        self.out_features, self.in_features = (int(s) for s in int8.shape)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(self.compute_dtype).mul_(self.weight_scb.unsqueeze(1).mul(1.0 / 127.0))

    @property
    def weight(self) -> nn.Parameter:
        return nn.Parameter(self.dequantize(), requires_grad=False)

    _apply = Packed4bitLinear._apply

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, compute_dtype={self.compute_dtype}"


class PackedTorchaoLinear(nn.Module):
    """A captured linear whose weight is a torchao quantized tensor (kept as it is, shared with the caller's
    model, never written); ``weight`` dequantizes it on read (the tensor's own ``dequantize()``)."""

    quant_type = "torchao"
    nested = False

    def __init__(self, quantized: torch.Tensor, compute_dtype: torch.dtype, bias: nn.Parameter | None):
        super().__init__()
        self.register_buffer("weight_quantized", quantized.detach())
        self.compute_dtype = compute_dtype
        self.bias = bias
        self.out_features, self.in_features = (int(s) for s in quantized.shape)

    def dequantize(self) -> torch.Tensor:
        w = self.weight_quantized.dequantize()
        return w if w.dtype == self.compute_dtype else w.to(self.compute_dtype)

    @property
    def weight(self) -> nn.Parameter:
        return nn.Parameter(self.dequantize(), requires_grad=False)

    _apply = Packed4bitLinear._apply

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{type(self.weight_quantized).__name__}, compute_dtype={self.compute_dtype}")


PACKED = (Packed4bitLinear, Packed8bitLinear, PackedTorchaoLinear)


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def install_quantized_weights(gm: nn.Module, facts: dict[str, dict]) -> None:
    """Replace each stand-in module of the captured ``gm`` (at the path it had in the caller's model)
    with a :class:`Packed4bitLinear` over the caller's packed bytes."""
    if not facts:
        return
    for path, f in facts.items():
        try:
            old = gm.get_submodule(path)
        except AttributeError:
            continue  # the linear is not used by forward: nothing was captured for it
        bias = old._parameters.get("bias")
        if "torchao" in f:
            new = PackedTorchaoLinear(f["torchao"], f["compute_dtype"], bias)
        elif "int8" in f:
            new = Packed8bitLinear(f["int8"], f["scb"], f["compute_dtype"], bias)
        else:
            new = Packed4bitLinear(f["packed"], f["quant_state"], f["compute_dtype"], bias)
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    _use_packed_linears(gm, set(facts))


class _Linear4bit(torch.autograd.Function):
    """``linear(x, W, b)`` over a :class:`Packed4bitLinear` that keeps no dense weight for backward: the
    input gradient dequantizes again (as bitsandbytes' ``MatMul4Bit``), so training holds packed bases."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.module, ctx.has_bias = module, bias is not None
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = ctx.module.dequantize()
            gx = grad @ (w if w.dtype == grad.dtype else w.to(grad.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb, None


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: Packed4bitLinear):
    """The captured graph's form of a 4-bit linear: ``weight`` is ``module.weight`` read just before the
    call (dequantized, transient), ``module`` the packed owner that backward dequantizes from again.
    Structure recognition reads it as ``aten.linear(x, W, b)`` (``graphadapt.structure.patterns``).
    While :func:`dense_base` holds a dense module there instead, this is ``linear(x, W, b)``."""
    if not isinstance(module, PACKED):
        return F.linear(x, weight, bias)
    return _Linear4bit.apply(x, weight, bias, module)


def _use_packed_linears(gm, paths: set[str]) -> None:
    """``aten.linear(x, get_attr(P.weight), b)`` → ``linear_4bit(x, get_attr(P.weight), b, get_attr(P))``,
    with each weight read right before its use (torch.export puts every ``get_attr`` at the graph's start,
    which would dequantize every weight of the model at once)."""
    graph = gm.graph
    changed = False
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.linear.default:
            continue
        w = n.args[1]
        owner = w.target.rpartition(".")[0] if getattr(w, "op", None) == "get_attr" else None
        if owner not in paths or not w.target.endswith(".weight"):
            continue
        x, b = n.args[0], (n.args[2] if len(n.args) > 2 else n.kwargs.get("bias"))
        with graph.inserting_before(n):
            wn = graph.get_attr(w.target)
            mn = graph.get_attr(owner)
            new = graph.call_function(linear_4bit, (x, wn, b, mn))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        if not w.users:
            graph.erase_node(w)
        changed = True
    if changed:
        gm.recompile()


def has_quantized_weights(gm: nn.Module) -> bool:
    return any(isinstance(m, PACKED) for m in gm.modules())


def refuse_quantized(gm: nn.Module, what: str, instead: str, error: type[Exception] = CaptureError) -> None:
    """Raise ``error`` naming the gap when ``gm`` has a packed 4-bit base that ``what`` cannot handle yet."""
    paths = [n for n, m in gm.named_modules() if isinstance(m, PACKED)]
    if paths:
        raise error(
            f"{what} is not available for a model over a quantized (bitsandbytes 4-bit) base yet: "
            f"{len(paths)} linear layer(s) keep packed 4-bit weights (e.g. `{paths[0]}`). {instead}")


# ---------------------------------------------------------------------------------------------------------
# quantization as a graph pass: apply(model, spec, quantize="nf4")

_QUANT_TYPES = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Quantize:
    """How :func:`graphadapt.apply` quantizes the frozen base linears (``quantize="nf4"`` is
    ``Quantize("nf4")``). The packed bytes are bitsandbytes' ``quantize_4bit`` of the weight as the
    captured model holds it — what transformers' ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...)`` loading path stores for the same weights.

    quant_type: ``"nf4"`` or ``"fp4"`` (bitsandbytes' 4-bit codes; blocks of ``blocksize`` values share an
        absmax scale), or ``"int8"``: each row as int8 with its absmax (LLM.int8's ``int8_vectorwise_quant`` of
        the fp16 weight, what ``BitsAndBytesConfig(load_in_8bit=True)`` stores; ``blocksize`` is unused).
    double_quant: store the block scales in 8 bits (bitsandbytes' ``compress_statistics``).
    blocksize: values per scale (64 is bitsandbytes' and transformers' default).
    compute_dtype: dtype the dequantized weight is used in (default: the weight's own dtype).
    skip: module paths left dense. By default (``None``) the output projection (``get_output_embeddings()``)
        and weights tied to another parameter stay dense, as transformers leaves them.
    """

    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None
    skip: tuple[str, ...] | None = None

    def __post_init__(self):
        from .errors import SpecError

        if self.quant_type not in _QUANT_TYPES:
            raise SpecError(f"quantize: quant_type must be one of {_QUANT_TYPES} (bitsandbytes 4-bit codes, or "
                            f"int8 rows with their absmax), got {self.quant_type!r}")
        if self.quant_type == "int8" and self.double_quant:
            raise SpecError("quantize: double_quant compresses 4-bit block scales; int8 keeps one fp32 scale per row")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise SpecError(f"quantize: blocksize must be a power of two from 32 to 4096, got {self.blocksize!r}")

    @classmethod
    def parse(cls, value) -> "Quantize":
        from .errors import SpecError

        if isinstance(value, Quantize):
            return value
        if isinstance(value, str):
            return cls(value.lower())
        if isinstance(value, dict):
            return cls(**value)
        raise SpecError(f"quantize must be 'nf4', 'fp4', a dict of Quantize fields or a Quantize, got {value!r}")


def _default_skip(gm: nn.Module, source: nn.Module | None) -> set[str]:
    skip: set[str] = set()
    get_out = getattr(source, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        skip |= {p for p, m in source.named_modules() if m is out}
    seen: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    for names in seen.values():
        if len(names) > 1:  # tied weights stay dense (quantizing one reader would change the other)
            skip |= {n.rpartition(".")[0] for n in names}
    return skip


def quantize_linears(gm: nn.Module, config: Quantize, source: nn.Module | None = None) -> list[str]:
    """``aten.linear(x, get_attr(P.weight), b)`` over a dense ``P`` → ``linear_4bit`` over a
    :class:`Packed4bitLinear` holding ``quantize_4bit(P.weight)`` (or, for ``int8``, a
    :class:`Packed8bitLinear` holding its int8 rows and their absmax); returns the quantized paths.

    Only modules owning nothing but ``weight`` (and ``bias``) whose weight the graph reads only in linears
    are quantized. ``gm``'s dense weights are dropped from ``gm`` (the caller's model keeps its own).

    Over a hollow ``source`` (:func:`graphadapt.outofcore.hollow_model`), a weight whose storage is hollow is
    read from the checkpoint, quantized and dropped, one at a time (the hollow allocation is never touched):
    the packed bytes are those of the same weight loaded in memory. Memory: the packed linears so far plus
    one dense weight (and bitsandbytes' temporaries for it)."""
    from bitsandbytes.functional import quantize_4bit

    from .hollow import hollow_storages, read_hollow

    skip = set(config.skip) if config.skip is not None else _default_skip(gm, source)
    readers: dict[str, list] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, []).extend(n.users)
    paths: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.aten.linear.default:
            continue
        w = n.args[1]
        if getattr(w, "op", None) != "get_attr" or not w.target.endswith(".weight"):
            continue
        owner = w.target.rpartition(".")[0]
        if owner in skip or owner in paths:
            continue
        mod = gm.get_submodule(owner)
        if isinstance(mod, PACKED) or set(mod._parameters) - {"weight", "bias"} or mod._buffers \
                or any(True for _ in mod.children()):
            continue
        if any(u.op != "call_function" or u.target is not torch.ops.aten.linear.default or u.args[1] is not w
               for u in readers.get(w.target, ())):
            continue
        weight = mod._parameters["weight"]
        if weight is None or weight.dim() != 2 or not weight.is_floating_point():
            continue
        paths.append(owner)
    hollow = hollow_storages(source)
    for owner in paths:
        mod = gm.get_submodule(owner)
        weight = mod._parameters["weight"]
        name = hollow.get(weight.untyped_storage().data_ptr()) if hollow else None
        dense = weight.detach() if name is None else read_hollow(source, name)
        cd = config.compute_dtype or weight.dtype
        if config.quant_type == "int8":
            new = Packed8bitLinear(*_int8_rows(dense), cd, mod._parameters.get("bias"))
        else:
            packed, qs = quantize_4bit(dense.contiguous(), blocksize=config.blocksize,
                                       compress_statistics=config.double_quant, quant_type=config.quant_type,
                                       quant_storage=torch.uint8)
            new = Packed4bitLinear(packed, qs, cd, mod._parameters.get("bias"))
        del dense
        parent, _, leaf = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
    _use_packed_linears(gm, set(paths))
    return paths


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 rows, their absmax)`` as bitsandbytes' ``Int8Params`` quantizes a weight on load: the weight
    in fp16, then ``int8_vectorwise_quant`` (round(127 · w / absmax(row)))."""
    from bitsandbytes.functional import int8_vectorwise_quant

    cb, scb, _ = int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
    return cb, scb


def base_bytes(gm: nn.Module, prefix: str | None = None) -> dict[str, float]:
    """Bytes the frozen base holds at rest: ``quantized_params`` / ``quantized_bytes`` (packed nibbles, block
    scales and code tables of the 4-bit linears), ``dense_params`` / ``dense_bytes`` (every other base tensor),
    and ``bytes_per_quantized_param`` / ``bytes_per_base_param``. Adapters (under ``prefix``) are not counted."""
    from .vocab import adapter_prefix

    prefix = adapter_prefix() if prefix is None else prefix
    qp = qb = 0
    quant_paths = set()
    for path, m in gm.named_modules():
        if isinstance(m, PACKED):
            quant_paths.add(path)
            qp += m.in_features * m.out_features
            qb += sum(_nbytes(b) for b in m._buffers.values() if b is not None)
    dp = db = 0
    seen = set()
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if name.startswith(prefix) or name.rpartition(".")[0] in quant_paths or id(t) in seen:
            continue
        seen.add(id(t))
        dp += t.numel()
        db += t.numel() * t.element_size()
    return {"quantized_params": qp, "quantized_bytes": qb, "dense_params": dp, "dense_bytes": db,
            "bytes_per_quantized_param": qb / qp if qp else float("nan"),
            "bytes_per_base_param": (qb + db) / (qp + dp) if qp + dp else float("nan")}


# ---------------------------------------------------------------------------------------------------------
# merge and export over a quantized base: a dense stand-in for the duration of a block

class DenseBaseLinear(nn.Module):
    """A dequantized base linear (frozen ``weight`` and ``bias``), installed by :func:`dense_base`."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.out_features, self.in_features = weight.shape


def dense_source_model(src: nn.Module, dense: dict[str, torch.Tensor]) -> nn.Module:
    """A dense Hugging Face model of ``src``'s class and config (without its ``quantization_config``) whose
    quantized linears' weights are ``dense[path]`` (shared, not copied) and every other tensor ``src``'s own."""
    import copy

    cfg = copy.deepcopy(src.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    with torch.device("meta"):
        out = type(src)(cfg)
    qpaths = {p for p, _ in quantized_modules(src)}
    state = {}
    for name, t in [*src.named_parameters(remove_duplicate=False), *src.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        if owner in qpaths and leaf == "weight":
            continue
        state[name] = t.detach()
    state.update({f"{p}.weight": w for p, w in dense.items()})
    out.load_state_dict(state, strict=False, assign=True)
    own_buffers = dict(src.named_buffers(remove_duplicate=False))
    for name, b in list(out.named_buffers(remove_duplicate=False)):
        if b.is_meta and name in own_buffers:  # non-persistent buffers (rotary tables) are not in state dicts
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner)._buffers[leaf] = own_buffers[name]
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(out, "tie_weights"):
        out.tie_weights()
    left = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if left:
        raise CaptureError(f"could not build a dense copy of {type(src).__name__}: no value for {left[:5]}")
    for p in out.parameters():
        p.requires_grad_(False)
    if getattr(src, "generation_config", None) is not None:
        out.generation_config = copy.deepcopy(src.generation_config)
    out.train(src.training)
    return out


@dataclass
class DenseBase:
    """What :func:`dense_base` installed: the quantized paths and the quantization they had."""

    paths: list[str]
    quantize: Quantize | None
    kind: str = ""  # "nf4", "fp4", "int8" (bitsandbytes 8-bit), "torchao"


@contextlib.contextmanager
def dense_base(gm: nn.Module, dtype: torch.dtype | None = None) -> Iterator[DenseBase]:
    """For the duration of the block, every :class:`Packed4bitLinear` of ``gm`` is a
    :class:`DenseBaseLinear` holding its dequantized weight (in its compute dtype, or ``dtype``), its
    ``linear_4bit`` calls are plain ``aten.linear`` and ``gm._source_model`` (when present) is a dense copy
    of the quantized source model sharing those weights — so merge, ``to_base_model``, ``save_merged`` and
    ONNX export see an unquantized model whose base is exactly what the packed forward computes with.
    Memory: one dense copy of the quantized linears. Everything is restored on exit."""
    found = [(p, m) for p, m in gm.named_modules() if isinstance(m, PACKED)]
    if not found:
        yield DenseBase([], None)
        return
    first = found[0][1]
    info = DenseBase([p for p, _ in found], Quantize(first.quant_type, first.nested, first.blocksize)
                     if isinstance(first, Packed4bitLinear) else None, first.quant_type)

    def dequantized(m):
        w = m.dequantize()
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    with dense_stand_ins(gm, found, dequantized):
        yield info


@contextlib.contextmanager
def dense_stand_ins(gm: nn.Module, found: list[tuple[str, nn.Module]], weight_of) -> Iterator[dict[str, torch.Tensor]]:
    """For the duration of the block, each packed module of ``found`` (``(path, module)``) is a
    :class:`DenseBaseLinear` holding ``weight_of(module)``, ``gm``'s ``linear_4bit`` calls are plain
    ``aten.linear``, and ``gm._source_model`` (when it holds quantized modules) is a dense copy of it sharing
    those weights. Yields ``{path: weight}``; everything is restored on exit. :func:`dense_base` (dequantized
    weights) and the quantized ONNX export's placeholders (untouched allocations) are its two uses."""
    swapped, rewired = [], []
    src_before = gm.__dict__.get("_source_model", None)
    had_src = "_source_model" in gm.__dict__
    try:
        dense: dict[str, torch.Tensor] = {}
        for path, m in found:
            w = dense[path] = weight_of(m)
            parent, _, leaf = path.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            setattr(holder, leaf, DenseBaseLinear(w, m.bias))
            swapped.append((holder, leaf, m))
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is linear_4bit:
                rewired.append((n, n.args))
                n.target, n.args = torch.ops.aten.linear.default, tuple(n.args[:3])
        if rewired:
            gm.recompile()
        if src_before is not None and quantized_modules(src_before):
            gm.__dict__["_source_model"] = dense_source_model(src_before, dense)
        yield dense
    finally:
        for n, args in reversed(rewired):
            n.target, n.args = linear_4bit, args
        for holder, leaf, m in reversed(swapped):
            setattr(holder, leaf, m)
        if rewired:
            gm.recompile()
        if had_src:
            gm.__dict__["_source_model"] = src_before


def requantize_linears(model: nn.Module, paths: list[str], config: Quantize) -> dict[str, float]:
    """Replace each dense linear of ``model`` at ``paths`` with a bitsandbytes ``Linear4bit`` holding
    ``quantize_4bit`` of its weight (as transformers' loading path would); returns the error the
    re-quantisation adds: ``max_abs`` (max |dequantized − dense| over all weights), ``max_rel_fro``
    (worst per-layer ‖dequantized − dense‖ / ‖dense‖) and ``worst`` (that layer's path)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    worst, max_abs, max_rel = "", 0.0, 0.0
    for path in paths:
        old = model.get_submodule(path)
        w = old.weight.detach()
        cd = config.compute_dtype or w.dtype
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=cd,
                                compress_statistics=config.double_quant, quant_type=config.quant_type,
                                device="meta")
        new.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, blocksize=config.blocksize,
                                       compress_statistics=config.double_quant, quant_type=config.quant_type,
                                       module=new)._quantize(w.device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        new.quant_state = new.weight.quant_state
        back = dequantize_4bit(new.weight.data, new.weight.quant_state).to(w.dtype)
        err = (back - w).float()
        a = err.abs().max().item()
        r = (err.norm() / w.float().norm().clamp_min(1e-30)).item()
        max_abs = max(max_abs, a)
        if r >= max_rel:
            worst, max_rel = path, r
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return {"max_abs": max_abs, "max_rel_fro": max_rel, "worst": worst}
