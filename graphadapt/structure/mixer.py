"""Token mixers that are not softmax attention: linear attention, state-space and convolution mixers.

before: a sub-block on the residual stream whose output projection (``out``) closes a residual add, whose
        input projections (``in``) read the sub-block's input (a norm of the stream, or the stream), and
        whose body between them mixes positions by something other than a softmax: a convolution along the
        sequence, a cumulative sum or product, a product of two activations (a recurrence written as
        matmuls), a triangular mask, a pad or a roll — gated delta-nets (Qwen3-Next, Qwen3.5), Mamba and
        Mamba-2 (Jamba, Bamba), lightning attention (MiniMax), short convolutions (LFM2).
after:  an :class:`AttentionBlock` of form ``"mixer"``: roles ``mixer_in`` (projections reading the sub-block
        input), ``mixer_inner`` (projections inside the mixer, e.g. Mamba's ``x_proj``), ``mixer_out``
        (the projection closing the residual add), the residual point as for attention. The recurrent core
        itself is left untouched. A body of elementwise ops only is a feed-forward block (not a mixer);
        a body with a softmax is an attention core that was not recognised (reported as such).

Pattern ``token_mixer``. Nothing here names a model class or a module.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.fx as fx

from .mla import whole_latent
from .ops import ADDS, SOFTMAX, is_op, node_args, strip
from .patterns import PATTERNS, RESIDUAL_ADD, Match, MatchFailure, Pattern, norm_consuming, scalar_scale
from .types import LinearSite

aten = torch.ops.aten


def _mixing_ops() -> frozenset:
    """Ops that move information between positions (the evidence of a token mixer)."""
    names = ["convolution.default", "_convolution.default", "cumsum.default", "cumprod.default",
             "logcumsumexp.default", "bmm.default", "matmul.default", "mm.default", "einsum.default",
             "tril.default", "triu.default", "flip.default", "roll.default", "constant_pad_nd.default",
             "pad.default", "conv1d.default", "conv1d.padding", "baddbmm.default", "scatter.src",
             "index_put.default", "index_put_.default", "copy_.default", "select_scatter.default",
             "slice_scatter.default"]
    out = set()
    for n in names:
        pkt, _, ov = n.partition(".")
        op = getattr(getattr(aten, pkt, None), ov, None)
        if op is not None:
            out.add(op)
    return frozenset(out)


MIXING = _mixing_ops()
_LIMIT = 4000


def _near_stream(stream: fx.Node, entry: fx.Node | None, out: LinearSite, ctx, depth: int = 16) -> set[fx.Node]:
    """The sub-block's input: the stream and what is computed from it before any projection (its norm, however
    written: a fused op, a decomposed RMSNorm, ``(1 + w)`` scales, casts), up to ``depth`` ops away."""
    src = _source(stream)
    near = {src} | ({_source(entry)} if entry is not None else set())
    frontier = list(near)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in near or u.op != "call_function" or u in ctx.site_of_node or u is out.node:
                    continue
                if is_op(u, MIXING) or ctx.by_output.get(u):
                    continue
                if is_op(u, ADDS) and all(isinstance(a, fx.Node) for a in u.args[:2]):
                    continue    # a residual add: the stream goes on past this sub-block
                near.add(u)
                nxt.append(u)
        frontier = nxt
    return near


def _body(out: LinearSite, entry: fx.Node | None, stream: fx.Node, ctx):
    """Walk back from ``out``'s input to the projections that read the sub-block input; ``(ins, inner, ops,
    why)``: ``why`` is set when the walk left the sub-block (reached the stream without a projection)."""
    stops = _near_stream(stream, entry, out, ctx)
    ins: list[LinearSite] = []
    inner: list[LinearSite] = []
    ops: list[fx.Node] = []
    seen: set[fx.Node] = set()
    q = deque([out.input])
    while q:
        n = q.popleft()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > _LIMIT:
            return ins, inner, ops, "the body is larger than the walk's bound"
        if _source(n) in stops:
            continue
        hit = ctx.by_output.get(n)
        if hit:
            s = next((x for x in hit if x.split_output is n), hit[0])
            src = _source(s.input)
            if src in stops:
                if all(s is not x for x in ins):
                    ins.append(s)
            else:
                if all(s is not x for x in inner):
                    inner.append(s)
                q.append(s.input)
            continue
        if n.op != "call_function":
            continue
        ops.append(n)
        q.extend(node_args(n.args))
        q.extend(node_args(tuple(n.kwargs.values())))
    return ins, inner, ops, None


def _source(n):
    """Through value-preserving ops and fixed scales to the tensor they carry (``norm(x) * alpha`` → ``norm(x)``)."""
    while True:
        n = strip(n)
        if not scalar_scale(n):
            return n
        n = next(a for a in n.args if isinstance(a, fx.Node))


def _mixer(p: Pattern, out: LinearSite, ctx, used: set[int]) -> Match | MatchFailure:
    r = ctx.matcher.run(RESIDUAL_ADD, out.output, ctx, None)
    if not r:
        return p.fail(out.node, f"its output does not close a residual add ({r.reason})")
    add, branch, stream, sibling = r.value
    if sibling is not None:
        return p.fail(add, "a parallel block (two branches into one add)")
    norm = norm_consuming(stream, ctx.matcher)
    entry = norm.output if norm is not None else None
    ins, inner, ops, why = _body(out, entry, stream, ctx)
    if why:
        return p.fail(out.node, why)
    if not ins:
        return p.fail(out.node, "no projection upstream of it reads the sub-block's input (the stream or its norm)")
    taken = [s for s in ins + inner if id(s) in used]
    if taken:
        return p.fail(taken[0].node, f"{taken[0].name} already has the role {taken[0].role}")
    soft = [n for n in ops if is_op(n, SOFTMAX)]
    if soft:
        return p.fail(soft[0], "a softmax between the input and output projections: an attention core, not a "
                               "linear mixer")
    mixing = [n for n in ops if is_op(n, MIXING) or _hop(n)]
    if not mixing:
        return p.fail(out.node, "only elementwise ops between the input and output projections: a feed-forward "
                                "block, not a token mixer")
    return p.ok(add, (ins, inner, add, branch, stream, entry), via=tuple(mixing[:3]))


def _hop(n: fx.Node) -> bool:
    """A higher-order op (scan, while loop, a wrapped subgraph): a recurrence."""
    return n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)


TOKEN_MIXER = Pattern("token_mixer", frozenset(), "stream → [norm] → in projections → a body mixing positions "
                      "without softmax (conv, cumsum, matmul of activations, scan) → out projection → add(stream): "
                      "a linear-attention / state-space / convolution mixer", _mixer)
PATTERNS.setdefault(TOKEN_MIXER.name, TOKEN_MIXER)


def whole_sites(sites: list[LinearSite], all_sites: list[LinearSite]) -> list[LinearSite]:
    """Each fused slice among ``sites`` replaced by one site over its whole projection (as PEFT adapts the
    module); duplicates dropped, order kept."""
    out: list[LinearSite] = []
    for s in sites:
        if any(s.weight == o.weight and s.node is o.node for o in out):
            continue
        out.append(whole_latent(s, all_sites) if s.fused else s)
    return out


__all__ = ["MIXING", "TOKEN_MIXER", "whole_sites"]
