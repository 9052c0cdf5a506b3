"""q/k/v of a fused projection split by reshapes: the pattern ``qkv_rows``.

before: one projection ``y = linear(x, W_qkv)`` feeds the core's q, k and v through data
        movement only — ``view(…, heads, 3, head_dim) → select`` (Bloom), ``view(…, heads,
        3·head_dim) → transpose → chunk`` (GPT-NeoX), ``view(…, kv_heads, q_per_kv + 2, head_dim)
        → slice / index / broadcast_to → flatten`` (Falcon, multi-query and GQA) — so no
        contiguous channel range belongs to one role.
after:  per role, the *index set* of ``y``'s channels it reads, in the order the role's tensor
        lays them out (head-major), found by running those data-movement ops on a tensor of
        channel indices (``arange(total_out)`` broadcast to ``y``'s example shape): no layout is
        hard-coded per model. The recogniser then gives each role its own
        :class:`~graphadapt.structure.types.LinearSite` with ``out_rows``.

A role's channels are those carried by the index-tensor nodes upstream of its core input
that the other two roles do not also come through; they must be disjoint across roles.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .ops import PASSTHROUGH, node_args
from .patterns import PATTERNS, Pattern, describe

aten = torch.ops.aten

# pure data movement: every output element is a copy of one input element
_MOVES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.select.int, aten.slice.Tensor, operator.getitem, aten.chunk.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.index.Tensor, aten.index_select.default, aten.t.default, aten.repeat_interleave.self_int,
    aten.movedim.int,
}
for _name in ("broadcast_to", "numpy_T", "squeeze"):
    _op = getattr(aten, _name, None)
    if _op is not None:
        _MOVES |= {getattr(_op, o) for o in _op.overloads()}
_NODES_LIMIT = 400


class _Opaque(Exception):
    """An argument that is neither a channel-index tensor, a constant, nor a size."""


def _size(v):
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        if hint is None:
            raise _Opaque("a size without an example value")
        return int(hint)
    return v


def _constant(gm: fx.GraphModule, n: fx.Node):
    if n.op == "get_attr":
        obj = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj
    if n.op == "call_function" and n.target == aten.lift_fresh_copy.default and isinstance(n.args[0], fx.Node):
        return _constant(gm, n.args[0])
    val = n.meta.get("val")
    if isinstance(val, (int, torch.SymInt)):
        return _size(val)
    raise _Opaque(describe(n))


def _evaluate(gm: fx.GraphModule, n: fx.Node, ids: dict):
    def arg(a):
        if isinstance(a, fx.Node):
            return ids[a] if a in ids else _constant(gm, a)
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return _size(a)

    args = arg(n.args)
    kwargs = {k: arg(v) for k, v in n.kwargs.items()}
    if n.target in PASSTHROUGH:     # value-preserving casts and copies: the same channels
        return args[0]
    return n.target(*args, **kwargs)


def channel_ids(gm: fx.GraphModule, out: fx.Node, width: int, order: dict) -> dict:
    """``{node: tensor of y's channel indices}`` for ``out`` (= ``y``) and the data-movement
    nodes downstream of it (tuples of tensors for chunk/split/unbind)."""
    val = out.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.shape[-1] != width:
        return {}
    try:
        shape = [_size(s) for s in val.shape]
    except _Opaque:
        return {}
    ids = {out: torch.arange(width).expand(*shape)}
    frontier = [out]
    while frontier and len(ids) < _NODES_LIMIT:
        n = frontier.pop(0)
        for u in sorted(n.users, key=order.__getitem__):
            if u in ids or u.op != "call_function" or not (u.target in _MOVES or u.target in PASSTHROUGH):
                continue
            if sum(1 for a in node_args(u.args) + node_args(list(u.kwargs.values())) if a in ids) != 1:
                continue
            try:
                ids[u] = _evaluate(gm, u, ids)
            except Exception:   # an op this bookkeeping cannot replay: the trace stops there
                continue
            frontier.append(u)
    return ids


def _frontier(start: fx.Node, ids: dict, first: int, order: dict) -> tuple[list, set]:
    """Upstream of ``start`` (not before position ``first``): the index-carrying nodes whose values
    leave the data movement there (read by computation on the way to ``start``, or ``start``
    itself), and all index-carrying nodes passed."""
    seen, stack = set(), [start]
    while stack and len(seen) < 20 * _NODES_LIMIT:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node) or order.get(n, -1) < first:
            continue
        seen.add(n)
        stack.extend(node_args(n.args))
    moved = {n for n in seen if isinstance(ids.get(n), torch.Tensor)}
    edge = [n for n in moved if n is start or any(u in seen and u not in ids for u in n.users)]
    return sorted(edge, key=order.__getitem__), moved


def _first_appearance(t: torch.Tensor) -> list[int]:
    """Distinct values of ``t`` in row-major order of first appearance (head-major channels)."""
    flat = t.reshape(-1)
    uniq, inv = torch.unique(flat, return_inverse=True)
    first = torch.full((len(uniq),), flat.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(flat.numel()), reduce="amin")
    return uniq[first.argsort()].tolist()


def _qkv_rows(p: Pattern, core: fx.Node, fused, inputs: dict, ctx):
    """``value``: ``{role: tuple of channel indices}`` for the roles of ``inputs`` (role → core argument)."""
    out = fused.output
    ids = channel_ids(ctx.gm, out, fused.total_out or fused.out_features, ctx.order)
    if len(ids) <= 1:
        return p.fail(out, "the fused output is not followed by data-movement ops (view/permute/select/slice/"
                           "chunk/index) that could be replayed on channel indices")
    first = ctx.order[out]
    rows = {}
    for r, x in inputs.items():
        edge, moved = _frontier(x, ids, first, ctx.order)
        if not edge:
            return p.fail(x, f"the core's {r} input does not come from the fused output through data movement")
        chans = set()
        for n in edge:
            chans.update(torch.unique(ids[n]).tolist())
        if len(chans) == (fused.total_out or fused.out_features):
            return p.fail(edge[0], f"the core's {r} input reads every channel of the fused output here")
        cover = [n for n in sorted(moved, key=ctx.order.__getitem__) if set(torch.unique(ids[n]).tolist()) == chans]
        rows[r] = tuple(_first_appearance(ids[cover[0]])) if cover else tuple(sorted(chans))
    roles = list(rows)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if set(rows[a]) & set(rows[b]):
                return p.fail(out, f"{a} and {b} read some of the same channels of the fused output")
    return p.ok(fused.node, rows)


QKV_ROWS = Pattern("qkv_rows", frozenset(),
                   "a fused q/k/v projection cut by reshapes (view/select/chunk/index; head-interleaved): "
                   "per role, the index set of its channels, replayed on channel indices", _qkv_rows)
PATTERNS.setdefault(QKV_ROWS.name, QKV_ROWS)
