"""Mixture-of-experts graph helpers: which expert each row uses, and the portable lowering of
grouped expert products for export.

before (captured): ``y = grouped_mm(x[S, in], W[E, in, out], offsets[E])`` — rows of ``x`` sorted by
        expert, ``offsets`` the cumulative row counts (``histc`` of the sorted expert ids, then
        ``cumsum``); an opaque custom op (``transformers::grouped_mm_fallback``) or ``aten._grouped_mm``,
        neither of which ONNX has
after (:func:`lower_grouped_mm`): ``ids = Σ_e [row ≥ offsets[e]]`` (the row's expert) and
        ``y = where(ids == E-1, x @ W[E-1], … where(ids == 1, x @ W[1], x @ W[0]))`` — one dense
        ``MatMul`` per expert over all S rows, selected per row; ``histc(v, E, lo, hi)`` becomes a
        one-hot count. Only standard ops, so the routing (top-k, its normalisation, the sort) is
        exported as computed. Cost: every expert multiplies every routed row (E× the FLOPs of the
        grouped product, peak extra memory one ``[S, out]`` product); exact per row, since each
        row's value is one of the products, selected without arithmetic.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from . import PassResult

aten = torch.ops.aten

__all__ = ["KIND", "expert_ids", "expert_onehot", "has_grouped_experts", "lower_grouped_mm"]

KIND = "experts"


def expert_ids(offsets: Tensor, rows: int) -> Tensor:
    """Expert index of each of ``rows`` rows sorted by expert, from the cumulative ``offsets`` [E]
    (rows past ``offsets[-1]`` get ``E``: no expert)."""
    r = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return (r.unsqueeze(-1) >= offsets.unsqueeze(0)).sum(-1)


def expert_onehot(offsets: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``[rows, E]`` one-hot of each row's expert (all zero past ``offsets[-1]``)."""
    ids = expert_ids(offsets, rows)
    e = torch.arange(offsets.shape[0], device=offsets.device, dtype=ids.dtype)
    return (ids.unsqueeze(-1) == e).to(dtype)


def _is_grouped_mm(n) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    last = str(n.target).rsplit("::", 1)[-1]
    return ("grouped_mm" in last) and "backward" not in last


def has_grouped_experts(gm: fx.GraphModule) -> bool:
    return any(_is_grouped_mm(n) for n in gm.graph.nodes)


def lower_grouped_mm(gm: fx.GraphModule) -> PassResult:
    """Replace every grouped expert product and ``histc`` with standard ops (see the module docstring)."""
    g = gm.graph
    lowered, hist = [], []
    for n in list(g.nodes):
        if _is_grouped_mm(n):
            x, w = n.args[0], n.args[1]
            offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
            val = w.meta.get("val") if isinstance(w, fx.Node) else None
            if val is None or val.dim() != 3 or offs is None:
                continue
            num = int(val.shape[0])
            with g.inserting_before(n):
                rows = g.call_function(aten.sym_size.int, (x, 0))
                ar = g.call_function(aten.arange.default, (rows,), {"dtype": torch.int64})
                ge = g.call_function(aten.ge.Tensor, (g.call_function(aten.unsqueeze.default, (ar, -1)),
                                                      g.call_function(aten.unsqueeze.default, (offs, 0))))
                ids = g.call_function(aten.sum.dim_IntList, (ge, [-1]))
                out = None
                for e in range(num):
                    ye = g.call_function(aten.mm.default, (x, g.call_function(aten.select.int, (w, 0, e))))
                    if out is None:
                        out = ye
                        continue
                    mask = g.call_function(aten.unsqueeze.default, (g.call_function(aten.eq.Scalar, (ids, e)), -1))
                    out = g.call_function(aten.where.self, (mask, ye, out))
            n.replace_all_uses_with(out)
            g.erase_node(n)
            lowered.append(n.name)
        elif n.op == "call_function" and n.target is aten.histc.default:
            x = n.args[0]
            bins = n.args[1] if len(n.args) > 1 else n.kwargs.get("bins", 100)
            lo = n.args[2] if len(n.args) > 2 else n.kwargs.get("min", 0)
            hi = n.args[3] if len(n.args) > 3 else n.kwargs.get("max", 0)
            if not (isinstance(bins, int) and isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or hi <= lo:
                continue   # data-dependent range: left as is
            with g.inserting_before(n):
                # torch.histc: bin = floor((v - lo) * bins / (hi - lo)), v == hi in the last bin, outside dropped
                pos = g.call_function(aten.mul.Tensor, (g.call_function(aten.sub.Tensor, (x, lo)), bins / (hi - lo)))
                b = g.call_function(aten.clamp.default, (g.call_function(aten.floor.default, (pos,)), None,
                                                         float(bins - 1)))
                b = g.call_function(aten.masked_fill.Scalar, (b, g.call_function(aten.gt.Scalar, (x, hi)), -1.0))
                ar = g.call_function(aten.arange.default, (bins,), {"dtype": torch.float32})
                eq = g.call_function(aten.eq.Tensor, (g.call_function(aten.unsqueeze.default, (b, -1)), ar))
                cnt = g.call_function(aten.sum.dim_IntList, (g.call_function(
                    aten._to_copy.default, (eq,), {"dtype": x.meta["val"].dtype if "val" in x.meta else torch.float32}),
                    [0]))
            n.replace_all_uses_with(cnt)
            g.erase_node(n)
            hist.append(n.name)
    return PassResult(gm, bool(lowered or hist), {"grouped_mm": lowered, "histc": hist})
