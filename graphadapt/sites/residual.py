"""Residual points: an adapter module replaces a sub-block's residual add (and the norm after it, post-LN),
called ``(h, r, ln_w, ln_b) → out``.

Selection: the spec's ``includes_layer(i)`` and the method's ``positions(spec)`` (``"mh"`` after attention,
``"output"`` after the feed-forward); insertion by :mod:`graphadapt.passes.residual`; composition by
:class:`~graphadapt.composition.site.ResidualComposition`, which drives the modules' explicit
``pre``/``core``/``post`` protocol (:class:`~graphadapt.composition.site.ResidualSiteModule`).

The method protocol (:class:`graphadapt.methods.base.ResidualSiteMethod`): ``positions(spec)``;
``prepare(gm, adapter, spec, targets, seed) → extra build kwargs`` (e.g. parameters shared by every layer);
``build(spec, adapter, target, seed, hidden=…, norm=…, ref=…, **extra)``.
"""

from __future__ import annotations

from ..composition.route import ResidualRoute
from ..composition.site import ResidualComposition, RouteNode, fusions
from ..passes import residual as residual_pass
from ..vocab import CombinePolicy, SiteKind
from .base import SiteKindPlugin, register_site_kind


@register_site_kind
class ResidualKind(SiteKindPlugin):
    kind = SiteKind.RESIDUAL
    phase = 10
    combine = CombinePolicy.EXCLUSIVE
    composable = True

    def select(self, sm, spec, adapter, method):
        return residual_pass.select_residual_points(sm, method.positions(spec), spec.includes_layer, adapter,
                                                    method.name)

    def key(self, site) -> str:
        return residual_pass.site_key(site)

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)

        def build(t, hidden, norm, ref):
            return method.build(spec, adapter, t, seed, hidden=hidden, norm=norm, ref=ref, **extra)

        return residual_pass.insert_residual_adapter(gm, ctx, adapter, method.name, sites, build)

    def compose(self, gm, ctx, target, site, tree, modules, fusion_layer):
        ref = residual_pass.reference_parameter(gm, site)
        fl = {name: fusion_layer(name, cfg, site.hidden_size, ref) for name, cfg in fusions(tree)}
        if isinstance(tree, RouteNode):
            norm = site.site.norm_after
            mod = ResidualRoute(tree, modules, norm.kind if norm is not None else None, norm.eps if norm else 0.0)
        else:
            mod = ResidualComposition(tree, modules, fl)
        gm.add_submodule(target, mod)
        residual_pass.wire_residual(gm, ctx, target, site)
        return site.layer.index, site.position, fl


__all__ = ["ResidualKind"]
