"""Quantized base weights (bitsandbytes 4-bit NF4/FP4) through capture, as ordinary linear sites.

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

Not yet: 8-bit (``Int8Params``) bases, which are refused clearly by :func:`check_supported`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CaptureError

__all__ = ["Packed4bitLinear", "opaque_quantized_linears", "install_quantized_weights", "quantized_modules",
           "has_quantized_weights", "refuse_quantized"]


def _is_bnb(p, cls_name: str) -> bool:
    t = type(p)
    return t.__name__ == cls_name and t.__module__.startswith("bitsandbytes")


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every module whose own ``weight`` is a bitsandbytes 4-bit or 8-bit parameter."""
    out = []
    for path, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None and (_is_bnb(w, "Params4bit") or _is_bnb(w, "Int8Params")):
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
        for path, m in found:
            w = m._parameters["weight"]
            packed, qs = w.data, w.quant_state
            cd = _compute_dtype(m, qs)
            out_f, in_f = (int(s) for s in qs.shape)
            saved.append(_Saved(m, w, m.__dict__.get("forward")))
            standin = torch.zeros((), dtype=cd, device=w.device).expand(out_f, in_f)
            m._parameters["weight"] = nn.Parameter(standin, requires_grad=False)
            m.forward = _standin_forward(m, cd)
            facts[path] = {"packed": packed, "quant_state": qs, "compute_dtype": cd}
        yield facts
    finally:
        for s in reversed(saved):
            s.module._parameters["weight"] = s.weight
            if s.own_forward is None:
                s.module.__dict__.pop("forward", None)
            else:
                s.module.forward = s.own_forward


def check_supported(found: list[tuple[str, nn.Module]]) -> None:
    int8 = [p for p, m in found if _is_bnb(m._parameters["weight"], "Int8Params")]
    if int8:
        raise CaptureError(
            f"{len(int8)} linear layer(s) have a bitsandbytes 8-bit base (e.g. `{int8[0]}`): graphadapt captures "
            "4-bit (NF4/FP4) bitsandbytes bases only so far. Load the model with "
            "BitsAndBytesConfig(load_in_4bit=True, ...) or unquantized.")
    for path, m in found:
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
    Structure recognition reads it as ``aten.linear(x, W, b)`` (``graphadapt.structure.patterns``)."""
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
    return any(isinstance(m, Packed4bitLinear) for m in gm.modules())


def refuse_quantized(gm: nn.Module, what: str, instead: str, error: type[Exception] = CaptureError) -> None:
    """Raise ``error`` naming the gap when ``gm`` has a packed 4-bit base that ``what`` cannot handle yet."""
    paths = [n for n, m in gm.named_modules() if isinstance(m, Packed4bitLinear)]
    if paths:
        raise error(
            f"{what} is not available for a model over a quantized (bitsandbytes 4-bit) base yet: "
            f"{len(paths)} linear layer(s) keep packed 4-bit weights (e.g. `{paths[0]}`). {instead}")
