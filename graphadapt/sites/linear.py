"""Linear sites (and expert sites): adapter modules after a linear op, called ``(x, y, W, b) → y'``.

Selection by the spec's :class:`~graphadapt.spec.targets.LinearTargets` (``targets``/``layers``/
``leave_out``); insertion by :mod:`graphadapt.passes.linear` (several adapters on one site chain in plan
order); composition by :class:`~graphadapt.composition.site.LinearComposition`. A fused projection (GPT-2's
``c_attn``) gives one site per slice (``site.out_slice``/``site.out_rows``, ``site.total_out``): the module
owns those channels only (:class:`graphadapt.methods.sliced.SlicedSiteModule`).

The method protocol (:class:`graphadapt.methods.base.LinearSiteMethod`): ``prepare(gm, adapter, spec, sites,
seed) → extra build kwargs`` once, then ``build(spec, adapter, site, seed, weight=W, **extra)`` per site
returning a module implementing :class:`graphadapt.passes.modules.LinearSiteModule` (or ``(module,
new_weight)``: the new base weight is installed as a new Parameter, as PiSSA needs).

Expert sites (mixture of experts: ``grouped_mm`` over a 3-d weight, ``site.num_experts``) are selected by
the same targets (the ``expert_*`` roles) and inserted by the same pass; the module also reads the routing
offsets ``(x, y, W, b, routing)``. Composition blocks are not defined there yet.
"""

from __future__ import annotations

from ..composition.route import LinearRoute
from ..composition.site import LinearComposition, RouteNode, describe, fusions
from ..errors import SpecError
from ..passes import linear as linear_pass
from ..passes.select import select_linear_sites
from ..vocab import CombinePolicy, SiteKind
from .base import SiteKindPlugin, register_site_kind


@register_site_kind
class LinearKind(SiteKindPlugin):
    kind = SiteKind.LINEAR
    phase = 0
    combine = CombinePolicy.CHAIN
    composable = True

    def select(self, sm, spec, adapter, method):
        return select_linear_sites(sm, spec, adapter)

    def key(self, site) -> str:
        return linear_pass.site_key(site)

    def physical_kind(self, site) -> SiteKind:
        return linear_pass.kind_of(site)

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)

        def build(site, weight):
            out = method.build(spec, adapter, site, seed, weight=weight, **extra)
            if isinstance(out, tuple):
                mod, new_w = out
                if new_w is not None:
                    linear_pass.replace_parameter(gm, site.weight, new_w)
                return mod
            return out

        return linear_pass.insert_linear_adapter(gm, adapter, method.name, sites, build, ctx)

    def compose(self, gm, ctx, target, site, tree, modules, fusion_layer):
        w = gm.get_parameter(site.weight)
        fl = {name: fusion_layer(name, cfg, site.total_out, w) for name, cfg in fusions(tree)}
        gm.add_submodule(target, (LinearRoute if isinstance(tree, RouteNode) else LinearComposition)(tree, modules, fl))
        linear_pass.insert_call(gm, target, site, ctx)
        return site.layer, site.role, fl


@register_site_kind
class ExpertKind(LinearKind):
    """Expert sites: a linear plugin's sites with ``num_experts`` (selected and inserted as linear sites)."""

    kind = SiteKind.EXPERT
    composable = False

    def refuse_composition(self, site, key, names, tree, describe_tree=describe):
        raise SpecError(f"composition blocks ({describe_tree(tree)}) are not supported at mixture-of-experts "
                        f"expert sites yet ({site.name}); compose adapters on other sites, or let them chain "
                        "(no active block)", field="active")


__all__ = ["ExpertKind", "LinearKind"]
