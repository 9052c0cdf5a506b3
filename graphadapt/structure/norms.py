"""Recognise normalisations in ATen graphs.

LayerNorm: ``aten.layer_norm(x, shape, w, b, eps)``.
RMSNorm (decomposed by every HF model we capture):
``[to] → pow(·,2) → mean(-1, keepdim) → add(eps) → rsqrt → mul(x, ·) → [to] → mul(w, ·)``;
also ``aten.rms_norm(x, shape, w, eps)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .types import NormSite

aten = torch.ops.aten

# value-preserving ops torch.export leaves around (a same-dtype ``to`` is a no-op at capture)
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.to.device,
}


def strip(n):
    """Follow value-preserving ops back to their source."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in PASSTHROUGH:
        n = n.args[0]
    return n


def _attr(n) -> str | None:
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _weight_of(n) -> tuple[str, float] | None:
    """A norm's scale operand: a parameter, maybe cast, maybe offset (Gemma's ``1 + w``)."""
    n = strip(n)
    if _attr(n) is not None:
        return n.target, 0.0
    if _is(n, aten.add.Tensor, aten.add.Scalar) and isinstance(n.args[1], (int, float)):
        base = strip(n.args[0])
        if _attr(base) is not None:
            return base.target, float(n.args[1])
    return None


def norm_at_output(node: fx.Node) -> NormSite | None:
    """If ``node`` is the output of a norm, describe it."""
    path = _path(node)
    outer = node
    if _is(node, *PASSTHROUGH):  # Gemma: ``type_as(normed * (1 + w), x)``
        node = strip(node)
    if _is(node, aten.layer_norm.default):
        a = node.args
        eps = a[4] if len(a) > 4 else 1e-5
        return NormSite("layer_norm", a[0], node, _attr(a[2]) if len(a) > 2 else None,
                        _attr(a[3]) if len(a) > 3 else None, float(eps), path)
    if _is(node, aten.rms_norm.default):
        a = node.args
        w = _attr(a[2]) if len(a) > 2 else None
        eps = a[3] if len(a) > 3 and a[3] is not None else 1e-6
        return NormSite("rms_norm", a[0], node, w, None, float(eps), path)
    # decomposed RMSNorm: mul(w, normed) or just normed
    weight, offset = None, 0.0
    inner = node
    if _is(node, aten.mul.Tensor):
        for i, other in ((0, 1), (1, 0)):
            w = _weight_of(node.args[i]) if isinstance(node.args[i], fx.Node) else None
            if w is not None and isinstance(node.args[other], fx.Node):
                (weight, offset), inner = w, node.args[other]
                break
    inner = strip(inner)
    if not _is(inner, aten.mul.Tensor):
        return None
    x, r = inner.args
    if _is(x, aten.rsqrt.default):
        x, r = r, x
    if not _is(r, aten.rsqrt.default):
        return None
    add = r.args[0]
    if not _is(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if not _is(mean, aten.mean.dim):
        return None
    pw = mean.args[0]
    if not _is(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2:
        return None
    if strip(pw.args[0]) is not strip(x):
        return None
    return NormSite("rms_norm", x, outer, weight, None, float(add.args[1]), path, weight_offset=offset)


def norm_consuming(node: fx.Node) -> NormSite | None:
    """The norm that takes ``node`` (or a value-preserving copy of it) as input, if any."""
    frontier = [node]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _is(u, aten.layer_norm.default, aten.rms_norm.default) and u.args[0] is n:
                return norm_at_output(u)
            if _is(u, aten.pow.Tensor_Scalar):
                # walk pow → mean → add → rsqrt → mul → [to] → mul(w); prefer the weighted form
                found = [ns for ns in map(norm_at_output, _forward_closure(u, 8))
                         if ns is not None and strip(ns.input) is strip(n)]
                if found:
                    return next((ns for ns in found if ns.weight is not None), found[0])
            if _is(u, *PASSTHROUGH):
                frontier.append(u)
    return None


def _forward_closure(n: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [], [n]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            for u in f.users:
                if u not in out:
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
    return out


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]
