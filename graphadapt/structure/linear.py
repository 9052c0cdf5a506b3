"""Normalise linear-like ATen forms to :class:`LinearSite`.

before: ``aten.linear(x, W, b)`` | ``view(x,[-1,in]) → addmm(b, ·, W[in,out]) → view(·,[B,T,out])`` |
        ``mm`` | ``x @ W.T`` | either followed by ``split``/``slice`` of the output channels (fused QKV)
after:  one ``LinearSite`` per (projection, output slice) with N-d input/output nodes.

The forms are the patterns ``linear``, ``addmm``, ``mm``, ``matmul_param`` and ``fused_split``
of :mod:`graphadapt.structure.patterns`.
"""

from __future__ import annotations

import torch.fx as fx

from .patterns import FUSED_SPLIT, LINEAR, LINEAR_INDEX, Matcher
from .types import LinearSite, Unmatched


def find_linear_sites(gm: fx.GraphModule, matcher: Matcher | None = None) -> tuple[list[LinearSite], list[Unmatched]]:
    m = matcher or Matcher()
    sites: list[LinearSite] = []
    unmatched: list[Unmatched] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        r = m.first(LINEAR_INDEX, n, gm)
        if r is None:
            continue
        if not r:
            if r.pattern == LINEAR.name:  # an mm/matmul of two activations is simply not a projection
                unmatched.append(Unmatched("linear", n.name, r.reason))
            continue
        site = r.value
        split = m.run(FUSED_SPLIT, site.output, site.out_features)
        if split:
            total = site.out_features
            for start, end, node in split.value:
                sites.append(LinearSite(
                    name=f"{site.name}[{start}:{end}]", module_path=site.module_path, node=site.node,
                    input=site.input, output=site.output, weight=site.weight, bias=site.bias,
                    in_features=site.in_features, out_features=end - start, layout=site.layout,
                    out_slice=(start, end), total_out=total, split_output=node, pattern=site.pattern))
        else:
            sites.append(site)
    return sites, unmatched
