"""Multi-head latent attention (MLA, DeepSeek-V2/V3), recognised from the dataflow graph.

before: an attention core whose keys and values both trace back to *one* projection (``kv_b``) that
        reads a normalised low-rank latent: ``kv_b(norm(kv_a(x)[…, :rank]))``; the keys' RoPE part comes
        from the rest of ``kv_a``'s channels (shared across heads) and the key is assembled piece by piece
        (``new_empty`` + ``copy_`` into slices, or ``cat``). Queries come from ``q_b(norm(q_a(x)))`` or
        from one projection ``q``.
after:  roles ``q_a``, ``q_b`` (or ``q``), ``kv_a`` (the whole latent projection, RoPE channels
        included), ``kv_b``; ``o`` and the residual point as for any attention block.

Pattern ``mla``. Nothing here names a model class or a module: a "latent" is a linear site reached
from a projection's input through a norm and shape ops alone.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .ops import PASSTHROUGH, SHAPE_OPS, is_op
from .patterns import PATTERNS, Match, MatchFailure, Pattern, norm_match
from .types import LinearSite


def _latent(x: fx.Node, ctx) -> LinearSite | None:
    """The projection whose output, normalised, is ``x`` (through shape ops): ``norm(a(h))`` → ``a``."""
    n = x
    for _ in range(6):
        if not is_op(n, SHAPE_OPS | PASSTHROUGH):
            break
        n = n.args[0]
    r = norm_match(n, ctx.matcher)
    if not r:
        return None
    n = r.value.input
    for _ in range(6):
        hit = ctx.by_output.get(n)
        if hit:
            sliced = [s for s in hit if s.split_output is n]
            return sliced[0] if sliced else hit[0]
        if not is_op(n, SHAPE_OPS | PASSTHROUGH):
            return None
        n = n.args[0]
    return None


def _mla(p: Pattern, core: fx.Node, q: LinearSite, kv: LinearSite, ctx) -> Match | MatchFailure:
    kv_a = _latent(kv.input, ctx)
    if kv_a is None:
        return p.fail(kv.node, "k and v share a projection whose input is not a normalised projection (no latent "
                               "kv_a → norm → kv_b)")
    q_a = _latent(q.input, ctx)
    entry = q_a.input if q_a is not None else q.input
    if q_a is not None and q_a.input is not kv_a.input:
        return p.fail(q_a.node, "the query latent and the key/value latent read different inputs")
    if q.input is not kv_a.input and q_a is None:
        return p.fail(q.node, "the query projection and the key/value latent read different inputs")
    roles = {"q_a": q_a, "q_b": q} if q_a is not None else {"q": q}
    roles.update(kv_a=kv_a, kv_b=kv)
    return p.ok(core, (roles, entry), (q.node, kv.node, kv_a.node))


MLA = Pattern("mla", frozenset(), "k and v from one projection kv_b(norm(kv_a(x))) [q from q_b(norm(q_a(x)))]: "
                                  "multi-head latent attention", _mla)
PATTERNS.setdefault(MLA.name, MLA)


def whole_latent(site: LinearSite, sites: list[LinearSite]) -> LinearSite:
    """``kv_a`` as one site over all its channels (its slices — the latent and the RoPE key — replaced in
    ``sites``): the role is the projection, as PEFT adapts the module."""
    if not site.fused:
        return site
    whole = dataclasses.replace(site, name=site.module_path, out_features=site.total_out, out_slice=None,
                                split_output=None, out_rows=None)
    idx = [i for i, s in enumerate(sites) if s.weight == site.weight and s.node is site.node]
    for i in reversed(idx):
        del sites[i]
    sites.insert(idx[0], whole)
    return whole


__all__ = ["MLA", "whole_latent"]
