"""Mixture-of-experts blocks, recognised from the dataflow graph.

before: a captured graph where a layer's feed-forward branch is
        ``router = linear(x, W_r) → softmax/sigmoid → topk`` feeding a dispatch (sort, offsets)
        and *grouped* matrix products ``grouped_mm(x_sorted, W[E, ·, ·], offsets)`` over
        3-d expert weights (transformers 5 stores experts fused), optionally plus a shared
        dense expert ``down(act(gate(x)) * up(x))`` scaled by ``sigmoid(linear(x, W_g))``
after:  an :class:`FFNBlock` with ``router``, ``experts`` (sites with roles ``expert_gate``,
        ``expert_up``, ``expert_down``; a fused ``gate_up`` weight cut by ``chunk`` gives one
        site per half), the shared expert's ``up``/``gate``/``down``, ``shared_expert_gate``,
        and the residual point with its norm — so LoRA/IA3 reach the experts and a bottleneck
        adapter can sit after the block.

Patterns (``MOE_PATTERNS``): ``expert_grouped_mm`` (an op whose name ends in ``grouped_mm``,
``(x, W or W.transpose(-2, -1), offsets)`` with ``W`` a 3-d parameter: ``aten._grouped_mm`` and
transformers' ``grouped_mm_fallback`` custom op), ``moe`` (the first add on the stream whose
branch contains expert ops), ``router`` (a linear site whose output reaches a ``topk`` through
casts and softmax/sigmoid/bias ops). Nothing here names a model class or a module.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

from .ops import ACTIVATIONS, PASSTHROUGH, is_op, strip_shape
from .patterns import FFN_GATE, FUSED_SPLIT, Match, MatchFailure, Matcher, Pattern, sites_feeding, stream_adds
from .types import FFNBlock, LinearSite, ResidualSite

aten = torch.ops.aten

_TRANSPOSE = {aten.transpose.int}
_ROUTER_PATH = PASSTHROUGH | {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten.add.Tensor,
                              aten.view.default, aten.reshape.default}


def is_grouped_mm(n) -> bool:
    """``aten._grouped_mm``, ``transformers::grouped_mm_fallback`` and the like (not their backward)."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    name = str(n.target).rsplit("::", 1)[-1].split(".")
    return any(part.endswith("grouped_mm") or part.endswith("grouped_mm_fallback") for part in name) \
        and "backward" not in str(n.target)


def _grouped_args(n: fx.Node):
    x = n.args[0]
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("mat2", n.kwargs.get("weight"))
    offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
    return x, w, offs


def _expert_grouped_mm(p: Pattern, n: fx.Node, gm: fx.GraphModule) -> Match | MatchFailure:
    x, w, offs = _grouped_args(n)
    layout = "conv1d"           # grouped_mm multiplies by W[e] as [in, out]
    src = w
    if is_op(w, _TRANSPOSE) and sorted(int(d) % 3 for d in w.args[1:3]) == [1, 2]:
        src, layout = w.args[0], "linear"   # W.transpose(-2, -1): W[e] stored as [out, in]
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return p.fail(n, "the expert weight is not a (transposed) parameter of the model")
    try:
        t = gm.get_parameter(src.target)
    except AttributeError:
        return p.fail(n, f"{src.target} is not a parameter")
    if t.dim() != 3 or not isinstance(offs, fx.Node) or not isinstance(x, fx.Node):
        return p.fail(n, "not (x, 3-d expert weight, offsets)")
    e, a, b = t.shape
    in_f, out_f = (b, a) if layout == "linear" else (a, b)
    name = src.target
    return p.ok(n, LinearSite(name=name, module_path=name, node=n, input=x, output=n, weight=name, bias=None,
                              in_features=in_f, out_features=out_f, layout=layout, total_out=out_f,
                              pattern=p.name, num_experts=e, routing=offs))


EXPERT_GROUPED_MM = Pattern("expert_grouped_mm", frozenset(), "grouped_mm(x sorted by expert, W[E,in,out] or "
                            "W[E,out,in].transpose(-2,-1), offsets): fused expert weights", _expert_grouped_mm)


def find_expert_sites(gm: fx.GraphModule, matcher: Matcher) -> list[LinearSite]:
    """One site per expert op (per piece when its output is cut by chunk/split, as ``gate_up``)."""
    out = []
    for n in gm.graph.nodes:
        if not is_grouped_mm(n):
            continue
        r = matcher.run(EXPERT_GROUPED_MM, n, gm)
        if not r:
            continue
        site = r.value
        split = matcher.run(FUSED_SPLIT, n, site.out_features)
        if split:
            for start, end, node in split.value:
                out.append(LinearSite(
                    name=f"{site.name}[{start}:{end}]", module_path=site.module_path, node=n, input=site.input,
                    output=n, weight=site.weight, bias=None, in_features=site.in_features, out_features=end - start,
                    layout=site.layout, out_slice=(start, end), total_out=site.out_features, split_output=node,
                    pattern=site.pattern, num_experts=site.num_experts, routing=site.routing))
        else:
            out.append(site)
    return out


# --------------------------------------------------------------------------- the block
def _closure(start: fx.Node, floor: int, order: dict, limit: int = 3000) -> set[fx.Node]:
    """Nodes upstream of ``start`` that come after position ``floor`` (the sub-block's body)."""
    seen, q = {start}, deque([start])
    while q and len(seen) < limit:
        n = q.popleft()
        for a in n.all_input_nodes:
            if a not in seen and a.op == "call_function" and order.get(a, -1) > floor:
                seen.add(a)
                q.append(a)
    return seen


def _reaches(start: fx.Node, goal, allowed, body: set, depth: int = 12) -> bool:
    frontier, seen = [start], {start}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u not in body:
                    continue
                seen.add(u)
                if goal(u):
                    return True
                if allowed is None or is_op(u, allowed) or u.target is operator.getitem:
                    nxt.append(u)
        frontier = nxt
    return False


def _router(p: Pattern, body: set, ctx) -> Match | MatchFailure:
    cands = sorted((s for s in ctx.sites if s.node in body and s.num_experts is None), key=lambda s: ctx.order[s.node])
    for s in cands:
        if _reaches(s.output, lambda u: is_op(u, {aten.topk.default}), _ROUTER_PATH, body):
            return p.ok(s.node, s)
    return p.fail(None, "no linear site in the branch reaches a topk through casts and softmax/sigmoid")


ROUTER = Pattern("router", frozenset(), "linear(x, W_r) → [cast] → softmax/sigmoid [+ bias] → topk", _router)


def _behind_activation(site: LinearSite, body: set) -> bool:
    out = site.split_output if site.split_output is not None else site.output
    return _reaches(out, lambda u: getattr(u.target, "__name__", str(u.target)).split(".")[0] in ACTIVATIONS,
                    PASSTHROUGH, body, depth=3)


def _moe(p: Pattern, stream_out: fx.Node, ctx, used: set[int], experts: list[LinearSite]) -> Match | MatchFailure:
    """``value``: ``FFNBlock`` (roles not yet written) for the first add on the stream whose branch holds
    expert ops; the add, its branch and the stream make the residual point."""
    by_node: dict[fx.Node, list[LinearSite]] = {}
    for s in experts:
        if id(s) not in used:
            by_node.setdefault(s.node, []).append(s)
    floor = ctx.order[stream_out]
    for add, via in stream_adds(stream_out, ctx):
        branch = add.args[1] if add.args[0] is via else add.args[0]
        body = _closure(branch, floor, ctx.order)
        ops = sorted((n for n in body if n in by_node), key=ctx.order.get)
        if not ops:
            continue
        r = ctx.matcher.run(ROUTER, body, ctx)
        if not r:
            return p.fail(add, f"{add.name}: its branch has expert ops but {r.reason}")
        router = r.value
        if id(router) in used:
            return p.fail(router.node, f"the router {router.name} is already used")
        # down: an expert op no other expert op reads; the others feed it (gate behind the activation)
        feeding = [n for n in ops if any(_reaches(n, lambda u: u is m, None, body, depth=40) for m in ops if m is not n)]
        downs = [n for n in ops if n not in feeding]
        if len(downs) != 1:
            return p.fail(add, f"{len(downs)} expert ops end the branch; expected one (the down projection)")
        blk = FFNBlock(router=router)
        sites: list[tuple[str, LinearSite]] = [("expert_down", by_node[downs[0]][0])]
        ups = [s for n in feeding for s in by_node[n]]
        gated = [s for s in ups if _behind_activation(s, body)]
        if len(ups) >= 2 and len(gated) == 1:
            sites += [("expert_gate", gated[0])] + [("expert_up", s) for s in ups if s is not gated[0]]
        else:
            sites += [("expert_up", s) for s in ups]
        blk.experts = [s for _, s in sites]
        for role, s in sites:
            s.role = role   # provisional; the recogniser writes roles only for a block it keeps
        blk.experts.sort(key=lambda s: ("expert_gate", "expert_up", "expert_down").index(s.role))
        # a shared dense expert: a linear site whose branch is fed by other unused linear sites
        taken = {id(router)} | used
        rest = sorted((s for s in ctx.sites if s.node in body and id(s) not in taken and s.num_experts is None),
                      key=lambda s: ctx.order[s.node])
        for d in reversed(rest):
            ins = [(s, a) for s, a in sites_feeding(ctx, d.input, taken) if s.node in body and s is not d]
            if ins:
                blk.down = d
                g = ctx.matcher.run(FFN_GATE, d, ins)
                blk.gate, blk.up = g.value if g else (None, ins[0][0])
                break
        shared = {id(s) for s in (blk.up, blk.gate, blk.down) if s is not None}
        for s in rest:
            if id(s) not in shared and s.out_features == 1:
                blk.shared_expert_gate = s
                break
        blk.residual = ResidualSite(add=add, branch=branch, stream=via)
        return p.ok(add, blk)
    return p.fail(stream_out, "no add on the stream has expert ops (grouped_mm over 3-d weights) in its branch")


MOE = Pattern("moe", frozenset(), "stream → add(stream, experts(router(x)) [+ shared expert]): the next add whose "
              "branch holds grouped expert products", _moe)

MOE_PATTERNS = {p.name: p for p in (EXPERT_GROUPED_MM, ROUTER, MOE)}


def moe_entry(blk: FFNBlock) -> fx.Node:
    """The block's input (the router's input, through reshapes): where a pre-LN norm is looked for."""
    return strip_shape(blk.router.input)


__all__ = ["EXPERT_GROUPED_MM", "MOE", "MOE_PATTERNS", "ROUTER", "find_expert_sites", "is_grouped_mm", "moe_entry"]
