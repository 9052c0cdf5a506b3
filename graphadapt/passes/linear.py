"""Insert adapter modules at linear sites (any method whose module is called as ``(x, y, W, b) → y'``).

before: ``y = linear(x, W, b)``                       (or GPT-2's ``addmm`` form; or a fused
        projection whose output is split afterwards)
after:  ``y' = call_module(adapters.<name>.<site>)(x, y, W, b)``; every former user of ``y``
        reads ``y'``. What the module computes is the method's business (LoRA adds ``s·B·A·x``,
        IA3 rescales, …); this pass only does *where*.

Several adapters on one site chain in plan order, ``m2(x, m1(x, y0, W, b), W, b)`` — the
plan's ``"chain"`` combination (:mod:`graphadapt.plan`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..structure.types import LinearSite
from ..vocab import SiteKind, adapter_target
from . import AdapterRecord, InsertContext, PassResult, annotate, annotation_of, get_attr_node, submodule_or_none

KIND = SiteKind.LINEAR


def kind_of(site: LinearSite) -> SiteKind:
    """``expert`` for a grouped expert product (its module also reads the routing), else ``linear``."""
    return SiteKind.EXPERT if getattr(site, "num_experts", None) else SiteKind.LINEAR


def _weight_args(gm: fx.GraphModule, site: LinearSite) -> tuple[fx.Node, fx.Node | None]:
    w = get_attr_node(gm, site.weight)
    b = get_attr_node(gm, site.bias) if site.bias else None
    return w, b


def insert_call(gm: fx.GraphModule, target: str, site: LinearSite, ctx: InsertContext | None = None) -> fx.Node:
    """Rewire ``site.output`` through the module registered at ``target`` (``ctx``: the site's input as a
    residual-point pass may have replaced it since the plan — a composition pass runs after those passes)."""
    kind = kind_of(site)
    w, b = _weight_args(gm, site)
    y = site.output
    # Chain after the adapters already on this output, so they run in plan order:
    # m2(x, m1(x, y0, W, b), W, b). DoRA rescales its incoming y, so order matters (as in PEFT).
    while True:
        tail = [u for u in y.users if u.op == "call_module" and u.args[1] is y
                and getattr(annotation_of(u), "kind", None) == kind]
        if not tail:
            break
        y = tail[0]
    with gm.graph.inserting_after(y):
        # expert sites (mixture of experts) also pass which expert each row uses: (x, y, W, b, routing)
        extra = (site.routing,) if getattr(site, "routing", None) is not None else ()
        x = site.input if ctx is None else ctx.live(site.input)
        node = gm.graph.call_module(target, args=(x, y, w, b) + extra)
    y.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    annotate(node, site.name, kind)
    if "val" in y.meta:
        node.meta["val"] = y.meta["val"]
    return node


Builder = Callable[[LinearSite, torch.Tensor], nn.Module]


def insert_linear_adapter(gm: fx.GraphModule, adapter_name: str, method_name: str, sites: list[LinearSite],
                          build: Builder, ctx: InsertContext | None = None) -> PassResult:
    """Install ``build(site, base_weight)`` at every linear site, one module per site name.

    Sites sharing a name use one weight at several places (ALBERT's shared layers): they get
    one module, called at every use, as wrapping the shared ``nn.Linear`` would. A module
    already at its target (re-planning after ``set_active``) is reused, trained weights and all.
    Where ``ctx`` says another party wires the site (a composition), the module is built but not wired.
    """
    ctx = ctx if ctx is not None else InsertContext()
    groups: dict[str, list[LinearSite]] = {}
    for site in sites:
        groups.setdefault(site.name, []).append(site)
    records: list[AdapterRecord] = []
    for name, group in groups.items():
        site = group[0]
        target = adapter_target(adapter_name, name)
        mod = submodule_or_none(gm, target)
        fresh = mod is None
        if fresh:
            mod = build(site, gm.get_parameter(site.weight))
            mod.train(gm.training)
            gm.add_submodule(target, mod)
        for s in group:
            if ctx.attaches(adapter_name, site_key(s)):
                insert_call(gm, target, s)
            records.append(AdapterRecord(
                adapter=adapter_name, method=method_name, site=s.name, target=target, kind=kind_of(s), role=s.role,
                layer=s.layer, weight=s.weight, bias=s.bias, layout=s.layout,
                num_experts=getattr(s, "num_experts", None) or None))
    return PassResult(gm, bool(sites), {"sites": [s.name for s in sites]}, records)


def replace_parameter(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Install a new Parameter object (never writes into storage shared with the caller's model)."""
    owner, _, leaf = qualname.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = mod._parameters[leaf]
    mod._parameters[leaf] = nn.Parameter(value.detach().to(old.dtype).clone(), requires_grad=old.requires_grad)


def site_key(site: LinearSite) -> str:
    """Identity of a linear site for the plan: its name (a fused slice has its own)."""
    return site.name


__all__ = ["KIND", "insert_call", "kind_of", "insert_linear_adapter", "replace_parameter", "site_key"]
