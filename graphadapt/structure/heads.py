"""The output head: the linear layer ``targets="all-linear"`` leaves out, found from dataflow.

before: the linear sites of a captured graph
after:  the sites whose output *is* a model output — reaching the graph's ``output`` node through
        nothing but shape ops, casts, dropout, scaling by a constant and logit soft-capping
        (``tanh(x / c) · c``): a language-model head, a classifier or a regression head.

PEFT's ``all-linear`` leaves out the output embedding (``get_output_embeddings()``) the same way:
adapting the head is ``modules_to_save``' job. A linear layer followed by anything else before the
output (the pooler's ``tanh`` without a scaling in front, a norm, another projection) is not a head.
Pattern ``output_head``; nothing here names a model class or a module.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .ops import PASSTHROUGH, SHAPE_OPS, is_op
from .patterns import PATTERNS, Match, MatchFailure, Matcher, Pattern
from .types import LinearSite

aten = torch.ops.aten

_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_THROUGH = SHAPE_OPS | PASSTHROUGH | {aten.dropout.default, aten.native_dropout.default}


def _const_scale(n: fx.Node, src: fx.Node) -> bool:
    """``src · c`` or ``src / c`` with ``c`` a Python number (not another tensor)."""
    return is_op(n, _SCALE) and n.args[0] is src and len(n.args) > 1 and isinstance(n.args[1], (int, float))


def _output_head(p: Pattern, site: LinearSite) -> Match | MatchFailure:
    start = site.split_output if site.split_output is not None else site.output
    frontier, seen, via = [start], {start}, [start]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                return p.ok(site.node, site, via)
            ok = is_op(u, _THROUGH) or _const_scale(u, n) or (
                is_op(u, {aten.tanh.default}) and _const_scale(n, n.args[0]))   # soft-capping tanh(x / c)
            if ok:
                via.append(u)
                frontier.append(u)
    return p.fail(site.node, "its output is not a model output (something other than shape ops, casts, dropout or "
                             "constant scaling comes between)")


OUTPUT_HEAD = Pattern("output_head", frozenset(), "a linear site whose output is a model output through shape ops, "
                                                  "casts, dropout and constant scaling (LM head, classifier)",
                      _output_head)
PATTERNS.setdefault(OUTPUT_HEAD.name, OUTPUT_HEAD)


def output_heads(sites: list[LinearSite], matcher: Matcher) -> list[Match]:
    """The head matches among ``sites`` (sites with a recognised role are never heads)."""
    out = []
    for s in sites:
        if s.role is None and s.num_experts is None:
            r = matcher.run(OUTPUT_HEAD, s)
            if r:
                out.append(r)
    return out


__all__ = ["OUTPUT_HEAD", "output_heads"]
