"""Inference-only optimisation passes (run on an inference copy of the graph, never on the trainable one).

``remove_eval_dropout``::

    before:  d = aten.dropout(x, p, False)        (eval mode: the identity)
    after:   users of d read x

``lower_low_rank`` (modules that offer :func:`~graphadapt.passes.modules.low_rank_delta`, i.e. whose whole
effect is ``y' = y + s · x Aᵀ Bᵀ``; the pass never asks which method they are)::

    before:  y1' = m1(x, y1, W1, b1);  y2' = m2(x, y2, W2, b2);  …      (sites reading the same x: q/k/v, gate/up)
    after:   h = linear(x, cat[A1; A2; …])            one GEMM for every down-projection reading x
             h1, h2, … = split(h, [r1, r2, …], -1)
             y1' = y1 + linear(h1, s1·B1);  y2' = y2 + linear(h2, s2·B2);  …   scaling folded into B
             (concat_up: u1, u2, … = split(linear(h, blockdiag(s1·B1, s2·B2, …)));  y1' = y1 + u1; …)

An inactive module becomes the identity (its call is removed). The factors are *copies* taken when the pass
runs (``cat[A]`` and ``s·B`` are buffers of the inference module): an inference copy is a snapshot of the
adapter weights. With one site per input (``concat=False``) and a power-of-two ``s`` the result is bitwise the
module's; otherwise the concatenated GEMM and ``s·B`` change rounding only (≤ 1e-6 relative in fp32).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..vocab import SiteKind
from . import PassResult, adapter_call_nodes, annotation_of, get_attr_node
from .modules import low_rank_delta

aten = torch.ops.aten

LOWERED_PREFIX = "_lowered"
"""Buffers the lowering pass adds (``_lowered_<i>_A``, ``_lowered_<i>_B<j>``), at the module's top level."""


def remove_eval_dropout(gm: fx.GraphModule) -> PassResult:
    """Drop ``aten.dropout`` nodes that are the identity (``train=False`` or ``p=0``)."""
    removed = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target == aten.dropout.default:
            x, p, train = n.args
            if not train or p == 0:
                n.replace_all_uses_with(x)
                gm.graph.erase_node(n)
                removed += 1
    return PassResult(gm, removed > 0, info={"removed": removed})


def _input_dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def lower_low_rank(gm: fx.GraphModule, concat: bool = True, concat_up: bool = True) -> PassResult:
    """Replace low-rank linear-site module calls by explicit GEMMs (see the module docstring).

    ``concat``: one GEMM for every down-projection reading the same input (else one per site). Modules
    without a :class:`~graphadapt.passes.modules.LowRankDelta`, in training mode, or whose input dtype is not
    the factors' (their forward casts) stay module calls. ``concat_up`` (with ``concat``): the up-projections of
    such a group as one GEMM over a block-diagonal ``s·B`` (the FLOPs of the whole block; worth it while a GEMM
    call costs more than its arithmetic — small models, per-op-bound runtimes)."""
    groups: dict[fx.Node, list[tuple[fx.Node, object]]] = {}
    removed = 0
    for n in adapter_call_nodes(gm):
        ann = annotation_of(n)
        if ann is None or ann.kind != SiteKind.LINEAR or len(n.args) < 2:
            continue
        mod = gm.get_submodule(str(n.target))
        if not getattr(mod, "active", True):
            n.replace_all_uses_with(n.args[1])
            gm.graph.erase_node(n)
            removed += 1
            continue
        delta = low_rank_delta(mod)
        if delta is None or mod.training or _input_dtype(n.args[0]) != delta.A.dtype:
            continue
        groups.setdefault(n.args[0], []).append((n, delta))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lowered = gemms = up_gemms = 0
    index = sum(1 for name, _ in gm.named_buffers() if name.startswith(LOWERED_PREFIX))
    for x, members in groups.items():
        members.sort(key=lambda m: order[m[0]])
        batches = [members] if concat else [[m] for m in members]
        for batch in batches:
            i, index, gemms = index, index + 1, gemms + 1
            ranks = [d.A.shape[0] for _, d in batch]
            a_name = f"{LOWERED_PREFIX}_{i}_A"
            gm.register_buffer(a_name, torch.cat([d.A for _, d in batch]).detach().clone())
            first = batch[0][0]
            a_node = get_attr_node(gm, a_name)
            with gm.graph.inserting_before(first):
                h = gm.graph.call_function(aten.linear.default, (x, a_node))
                parts = [h] if len(batch) == 1 or concat_up else [
                    gm.graph.call_function(operator.getitem, (split, j))
                    for split in [gm.graph.call_function(aten.split_with_sizes.default, (h, ranks, -1))]
                    for j in range(len(batch))]
            if concat_up and len(batch) > 1:
                # one up-projection GEMM too: a block-diagonal [Σ out, Σ r] of the s·B (zeros elsewhere add exact
                # zeros), its output split per site
                outs = [d.B.shape[0] for _, d in batch]
                blk = torch.zeros(sum(outs), sum(ranks), dtype=batch[0][1].B.dtype, device=batch[0][1].B.device)
                o = c = 0
                for (_, d), r_, out_ in zip(batch, ranks, outs):
                    blk[o:o + out_, c:c + r_] = d.B * d.scale
                    o, c = o + out_, c + r_
                b_name = f"{LOWERED_PREFIX}_{i}_B"
                gm.register_buffer(b_name, blk)
                b_node = get_attr_node(gm, b_name)
                with gm.graph.inserting_before(first):
                    up = gm.graph.call_function(aten.linear.default, (h, b_node))
                    split = gm.graph.call_function(aten.split_with_sizes.default, (up, outs, -1))
                    ups = [gm.graph.call_function(operator.getitem, (split, j)) for j in range(len(batch))]
                up_gemms += 1
            else:
                ups = []
                for j, ((node, d), part) in enumerate(zip(batch, parts)):
                    b_name = f"{LOWERED_PREFIX}_{i}_B{j}"
                    gm.register_buffer(b_name, (d.B * d.scale).detach().clone())
                    b_node = get_attr_node(gm, b_name)
                    with gm.graph.inserting_before(node):
                        ups.append(gm.graph.call_function(aten.linear.default, (part, b_node)))
                    up_gemms += 1
            for (node, d), up in zip(batch, ups):
                with gm.graph.inserting_before(node):
                    out = gm.graph.call_function(aten.add.Tensor, (node.args[1], up))
                out.meta.update({k: v for k, v in node.meta.items() if k == "val"})
                node.replace_all_uses_with(out)
                gm.graph.erase_node(node)
                lowered += 1
    return PassResult(gm, (lowered + removed) > 0, info={"lowered": lowered, "identity": removed,
                                                          "gemms": gemms, "up_gemms": up_gemms})


__all__ = ["LOWERED_PREFIX", "lower_low_rank", "remove_eval_dropout"]
