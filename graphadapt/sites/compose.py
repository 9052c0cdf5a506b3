"""The composition pass: wire one composition module at every composed site.

before: adapter modules built at the site but not in the graph (``InsertContext.attach_only``)
after:  linear site   ``y' = call_module(adapters._compose.<site>)(x, y, W, b)``
        residual site ``out = call_module(adapters._compose.<site>)(h, r, LN.w, LN.b)`` replacing ``LN(h + r)``
(each site kind's :meth:`~graphadapt.sites.base.SiteKindPlugin.compose` does its own wiring). A block holding a
``Parallel`` also repeats every batched input once per channel at the graph's start
(:func:`graphadapt.composition.insert.replicate_inputs`).

Fusion layers live at ``adapters.<fusion name>.<site>`` (trainable, saved with the adapters) and are reused
when the model is re-planned.
"""

from __future__ import annotations

from ..composition.insert import COMPOSE, fusion_layer
from ..composition.route import route_input
from ..composition.site import RouteNode
from ..passes import AdapterRecord, InsertContext, PassResult
from ..vocab import ADAPTERS, adapter_target
from .base import get_site_kind


def insert_compositions(gm, ctx: InsertContext, combos, sites: dict, seed: int, dropout: float) -> PassResult:
    """Wire a composition module at each composed site (``combos``: :class:`graphadapt.plan.Combination`
    with mode ``compose``; ``sites``: ``(kind, key)`` → site object)."""
    records: list[AdapterRecord] = []
    for c in combos:
        site = sites[(c.kind, c.site)]
        mods = {n: gm.get_submodule(adapter_target(c.owner(n), c.site)) for n in c.tree.names}
        target = f"{ADAPTERS}.{COMPOSE}.{c.site}"

        def make(name, config, width, ref, key=c.site):
            return fusion_layer(gm, name, key, config, width, seed, dropout, ref)

        layer, role, fl = get_site_kind(c.kind).compose(gm, ctx, target, site, c.tree, mods, make)
        if isinstance(c.tree, RouteNode):  # Route: the composition module also reads the row → adapter ids
            ids = route_input(gm, c.tree.ids_input)  # MultiTask: task_ids
            for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]:
                node.args = (*node.args, ids)
        text = c.tree.describe()
        for name in fl:
            records.append(AdapterRecord(adapter=name, method="fusion", site=c.site, target=adapter_target(name, c.site),
                                         kind=c.kind, role=role, layer=layer, composition=text))
        records.append(AdapterRecord(adapter=COMPOSE, method="composition", site=c.site, target=target, kind=c.kind,
                                     role=role, layer=layer, composition=text))
    return PassResult(gm, bool(combos), {"sites": [c.site for c in combos]}, records)


__all__ = ["insert_compositions"]
