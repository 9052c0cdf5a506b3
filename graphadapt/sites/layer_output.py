"""Layer outputs ("layer_output" sites): an adapter module rewrites the hidden states a transformer layer returns.

before::   layer i ─▶ out_i = LN(h + r)  (post-LN)  or  r + h  (pre-LN) ─▶ layer i+1 / model output
after::    out_i ─▶ call_module(adapters.<name>.<layer>.layer_output)(out_i, attention_mask) ─▶ every former reader

``out_i`` is the result of the layer's last residual point (the feed-forward one) — what a forward hook on the
layer module sees (AdapterHub's ReFT hooks exactly there). Whatever already replaced that point (a residual
adapter, a composition) is read, not bypassed: this kind's pass runs after the residual kind's, and a composition
wired later at the residual point feeds the module too (it rewires the point's readers, this module included).
``attention_mask`` is the graph's ``attention_mask`` input when it has one (None otherwise), so a module can find
each row's first and last real token. One module per layer; nothing is folded by ``merge``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..errors import SpecError
from ..passes import AdapterRecord, PassResult, annotate, submodule_or_none
from ..structure.types import Layer, ResidualSite, StructureMap
from ..vocab import CombinePolicy, SiteKind, adapter_target
from .base import SiteKindPlugin, register_site_kind

KIND = SiteKind.LAYER_OUTPUT
MASK_INPUT = "attention_mask"


@dataclass
class LayerOutputSite:
    """A layer's output: the node computing it (its last residual point's result) and the hidden size."""

    layer: Layer
    residual: ResidualSite
    hidden: int

    @property
    def node(self) -> fx.Node:
        norm = self.residual.norm_after
        return norm.output if norm is not None else self.residual.add

    @property
    def name(self) -> str:
        return f"{self.layer.module_path or f'layer{self.layer.index}'}.layer_output"


def select_layer_outputs(sm: StructureMap, includes_layer, adapter: str, label: str) -> list[LayerOutputSite]:
    """The outputs of the layers ``includes_layer`` accepts (SpecError if none, or if a layer has no defined one)."""
    out = []
    for layer in sm.layers:
        if not includes_layer(layer.index):
            continue
        res = layer.residual_sites().get("output")
        if res is None:
            raise SpecError(f"adapter {adapter!r}: layer {layer.index} has no recognised feed-forward residual point, "
                            f"so its output is unknown to {label}; see `graphadapt inspect`", field="layers")
        if res.parallel_with is not None:
            raise SpecError(f"adapter {adapter!r}: layer {layer.index} is a parallel attention+FFN block "
                            f"(x + attn(ln x) + mlp(ln x)); {label} adapters have no defined placement there yet",
                            field="method")
        val = (res.norm_after.output if res.norm_after is not None else res.add).meta.get("val")
        if not hasattr(val, "shape"):
            raise SpecError(f"adapter {adapter!r}: layer {layer.index}'s output has no recorded shape", field="method")
        out.append(LayerOutputSite(layer, res, int(val.shape[-1])))
    if not out:
        raise SpecError(f"adapter {adapter!r}: no layer selected (model has {len(sm.layers)} recognised layers; "
                        "check `layers`)", field="layers")
    return out


def insert_layer_output_adapter(gm: fx.GraphModule, ctx, adapter: str, method_name: str,
                                sites: list[LayerOutputSite], build) -> PassResult:
    """After each site's (live) output node, ``call_module(target)(out, attention_mask)``; every other reader of
    ``out`` reads the module's result. ``build(site)`` makes the module (reused when already there: re-planning)."""
    mask = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == MASK_INPUT), None)
    records = []
    for s in sites:
        target = adapter_target(adapter, s.name)
        if submodule_or_none(gm, target) is None:
            mod = build(s)
            gm.add_submodule(target, mod)
            mod.train(gm.training)
        if not ctx.attaches(adapter, s.name):
            records.append(AdapterRecord(adapter=adapter, method=method_name, site=s.name, target=target, kind=KIND,
                                         role="layer_output", layer=s.layer.index, wired=False))
            continue
        out = ctx.live(s.node)
        with gm.graph.inserting_after(out):
            node = gm.graph.call_module(target, args=(out, mask))
        annotate(node, s.name, KIND)
        if "val" in out.meta:
            node.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
        records.append(AdapterRecord(adapter=adapter, method=method_name, site=s.name, target=target, kind=KIND,
                                     role="layer_output", layer=s.layer.index))
    return PassResult(gm, bool(sites), {"sites": [s.name for s in sites]}, records)


@register_site_kind
class LayerOutputKind(SiteKindPlugin):
    """The hidden states each layer outputs. The spec says ``includes_layer``. Method protocol:
    ``prepare(gm, adapter, spec, sites, seed) → extra build kwargs``; ``build(spec, adapter, site, seed, **extra)``
    (``site.hidden``: the width) → a module called ``(h, attention_mask or None) → h'``. Several adapters at one
    layer output need a composition block, which this kind does not define (refused by the plan)."""

    kind = KIND
    phase = 15   # after residual points (it reads what they compute), before the embedding kind (20)
    combine = CombinePolicy.EXCLUSIVE

    def select(self, sm, spec, adapter, method):
        return select_layer_outputs(sm, spec.includes_layer, adapter, method.label)

    def key(self, site) -> str:
        return site.name

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)
        return insert_layer_output_adapter(gm, ctx, adapter, method.name, sites,
                                           lambda s: method.build(spec, adapter, s, seed, **extra))


__all__ = ["KIND", "LayerOutputKind", "LayerOutputSite", "insert_layer_output_adapter", "select_layer_outputs"]
