"""Parameter sites: an adapter module stands in for base parameters wherever the graph reads them.

before::

    get_attr(encoder.layer.0.output.LayerNorm.weight) ─▶ layer_norm(x, shape, w, b, eps)

after::

    get_attr(…LayerNorm.weight) ─▶ M(w, "weight") ─▶ layer_norm(x, shape, M(w,"weight"), M(b,"bias"), eps)

``M`` is one module per site (a group of parameters of one base module, e.g. a norm's weight and bias), called
``(p, local name) → p'`` at every read of each of its parameters — so a parameter the graph reads twice (tied input
and output embeddings) is replaced at both reads. Methods: LN tuning (trainable copies of norm weights), trainable
tokens (selected embedding rows).

The method protocol: ``parameter_sites(gm, sm, spec, adapter) → [ParameterSite]`` (selection: the method finds its
parameters by pattern on the graph), ``prepare``, ``build(spec, adapter, site, seed, params={local: tensor})``.
Several adapters at one site chain (each reads the previous one's value). ``merge`` folds a module with
``mergeable`` through ``fold_parameter(p, name) → p'`` (the parameter's new value) and removes its calls
(``passes/merge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..passes import AdapterRecord, PassResult, annotate
from ..vocab import CombinePolicy, SiteKind, adapter_target
from .base import SiteKindPlugin, register_site_kind

KIND = SiteKind.PARAMETER


@dataclass(frozen=True)
class ParameterSite:
    """Base parameters replaced together: ``params`` = ((qualified parameter name, local name), …)."""

    name: str                                   # the owning base module's path (the adapter module's path too)
    params: tuple[tuple[str, str], ...]
    role: str | None = None


def insert_parameter_adapter(gm: fx.GraphModule, ctx, adapter: str, method_name: str, sites, build) -> PassResult:
    graph = gm.graph
    records = []
    for site in sites:
        target = adapter_target(adapter, site.name)
        values = {local: gm.get_parameter(q) for q, local in site.params}
        mod = build(site, values)
        mod.train(gm.training)
        gm.add_submodule(target, mod)
        for qual, local in site.params:
            reads = [n for n in graph.nodes if n.op == "get_attr" and str(n.target) == qual]
            for read in reads:
                read = ctx.live(read)
                with graph.inserting_after(read):
                    node = graph.call_module(target, (read, local))
                annotate(node, site.name, KIND)
                read.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
                ctx.replaced[read] = node
        records.append(AdapterRecord(adapter=adapter, method=method_name, site=site.name, target=target, kind=KIND,
                                     role=site.role, weight=site.params[0][0]))
    return PassResult(gm, bool(records), {"sites": [s.name for s in sites]}, records)


@register_site_kind
class ParameterKind(SiteKindPlugin):
    kind = KIND
    phase = 5   # only adds nodes; before passes that replace nodes
    combine = CombinePolicy.CHAIN

    def select(self, sm, spec, adapter, method):
        nodes = [s.node for s in sm.linear_sites]
        gm = nodes[0].graph.owning_module if nodes else None
        return method.parameter_sites(gm, sm, spec, adapter)

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)
        return insert_parameter_adapter(gm, ctx, adapter, method.name, sites,
                                        lambda s, values: method.build(spec, adapter, s, seed, params=values,
                                                                       **extra))


__all__ = ["KIND", "ParameterKind", "ParameterSite", "insert_parameter_adapter"]
