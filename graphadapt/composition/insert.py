"""The composition pass: wire one composition module at every composed site.

before: adapter modules built at the site but not in the graph (``InsertContext.composed``)
after:  linear site   ``y' = call_module(adapters._compose.<site>)(x, y, W, b)``
        residual site ``out = call_module(adapters._compose.<site>)(h, r, LN.w, LN.b)`` replacing ``LN(h + r)``
        and, when the block holds a ``Parallel``, every batched input repeated once per channel at
        the graph's start (AdapterHub replicates at the first adapter layer; the layers before it
        compute the same rows either way).

Fusion layers live at ``adapters.<fusion name>.<site>`` (trainable, saved with the adapters) and
are reused when the model is re-planned.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import SpecError
from ..init import adapter_generator
from ..passes import AdapterRecord, InsertContext, PassResult, submodule_or_none
from ..passes import linear as linear_pass
from ..passes import residual as residual_pass
from ..vocab import ADAPTERS, adapter_target
from .fusion import FusionLayer
from .site import LinearComposition, ResidualComposition, describe, fusions, tree_names

COMPOSE = "_compose"


def _fusion_layer(gm, name: str, key: str, config: dict, hidden: int, seed: int, dropout: float, ref: torch.Tensor):
    target = adapter_target(name, key)
    mod = submodule_or_none(gm, target)
    if mod is None:
        mod = FusionLayer(hidden, config, dropout, adapter_generator(seed, name, key), dtype=ref.dtype,
                          device=ref.device)
        mod.train(gm.training)
        gm.add_submodule(target, mod)
    return mod


def replicate_inputs(gm: fx.GraphModule, channels: int) -> PassResult:
    """Repeat every batched tensor input ``channels`` times along the batch (``[x; x; …]``)."""
    g = gm.graph
    done = []
    for ph in [n for n in g.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        users = list(ph.users)
        with g.inserting_after(ph):
            rep = g.call_function(torch.ops.aten.cat.default, ([ph] * channels, 0))
        for u in users:
            u.replace_input_with(ph, rep)
        done.append(ph.target)
    return PassResult(gm, bool(done), {"replicated": done})


def insert_compositions(gm: fx.GraphModule, ctx: InsertContext, combos, sites: dict, seed: int,
                        dropout: float) -> PassResult:
    """Wire a composition module at each composed site (``combos``: :class:`graphadapt.plan.Combination`
    with ``mode == "compose"``; ``sites``: site key → site object)."""
    records: list[AdapterRecord] = []
    for c in combos:   # checked before anything is wired
        site = sites[(c.kind, c.site)]
        if c.kind == linear_pass.KIND and getattr(site, "num_experts", None):
            raise SpecError(f"composition blocks ({describe(c.tree)}) are not supported at mixture-of-experts "
                            f"expert sites yet ({site.name}); compose adapters on other sites, or let them chain "
                            "(no active block)", field="active")
    for c in combos:
        site = sites[(c.kind, c.site)]
        mods = {n: gm.get_submodule(adapter_target(c.owner(n), c.site)) for n in tree_names(c.tree)}
        target = f"{ADAPTERS}.{COMPOSE}.{c.site}"
        if c.kind == linear_pass.KIND:
            w = gm.get_parameter(site.weight)
            hidden = site.total_out
            fl = {name: _fusion_layer(gm, name, c.site, cfg, hidden, seed, dropout, w) for name, cfg in fusions(c.tree)}
            mod = LinearComposition(c.tree, mods, fl)
            gm.add_submodule(target, mod)
            linear_pass.insert_call(gm, target, site)
            layer, role = site.layer, site.role
        else:
            hidden = site.hidden_size
            ref = residual_pass.reference_parameter(gm, site)
            fl = {name: _fusion_layer(gm, name, c.site, cfg, hidden, seed, dropout, ref) for name, cfg in fusions(c.tree)}
            mod = ResidualComposition(c.tree, mods, fl)
            gm.add_submodule(target, mod)
            residual_pass.wire_residual(gm, ctx, target, site)
            layer, role = site.layer.index, site.position
        for name in fl:
            records.append(AdapterRecord(adapter=name, method="fusion", site=c.site, target=adapter_target(name, c.site),
                                         kind=c.kind, role=role, layer=layer, details={"composition": describe(c.tree)}))
        records.append(AdapterRecord(adapter=COMPOSE, method="composition", site=c.site, target=target, kind=c.kind,
                                     role=role, layer=layer, details={"composition": describe(c.tree)}))
    return PassResult(gm, bool(combos), {"sites": [c.site for c in combos]}, records)


__all__ = ["COMPOSE", "insert_compositions", "replicate_inputs"]
