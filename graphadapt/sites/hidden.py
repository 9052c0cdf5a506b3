"""Hidden states between layers ("hidden" sites): an adapter module rewrites the stream at a point between layers —
the embedding output (the stream entering the first layer) or a layer's output.

before::   … ─▶ s ─▶ next layer / model output
after::    … ─▶ s ─▶ call_module(adapters.<name>.<point>)(s, attention_mask) ─▶ every former reader of s

Points (the method's ``points(spec)``):

* ``"embedding_output"``: the stream entering the first layer (BERT: the embedding block's output after its norm;
  GPT-2: after the position embeddings and dropout; Llama: the token lookup) — site ``embeddings.output``;
* ``"layer_output"``: the result of each selected layer's last residual point (its feed-forward one) — what a
  forward hook on the layer module sees — site ``<layer path>.layer_output``.

Whatever already replaced a point (a residual adapter, a composition) is read, not bypassed: this kind's pass runs
after the residual kind's, and a composition wired later at a residual point feeds the module too (it rewires the
point's readers, this module included). ``attention_mask`` is the graph's ``attention_mask`` input when it has one
(None otherwise), so a module can find each row's real tokens. Nothing here is folded by ``merge``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..errors import SpecError
from ..passes import AdapterRecord, PassResult, annotate, submodule_or_none
from ..structure.types import Layer, ResidualSite, StructureMap
from ..vocab import CombinePolicy, SiteKind, adapter_target
from .base import SiteKindPlugin, register_site_kind

KIND = SiteKind.HIDDEN
MASK_INPUT = "attention_mask"
POINTS = ("embedding_output", "layer_output")


@dataclass
class HiddenSite:
    """A point of the stream: the node computing it, its width, and the layer it follows (None: the embeddings)."""

    point: str
    node: fx.Node
    hidden: int
    layer: Layer | None = None

    @property
    def name(self) -> str:
        if self.layer is None:
            return "embeddings.output"
        return f"{self.layer.module_path or f'layer{self.layer.index}'}.layer_output"


def _width(node: fx.Node, adapter: str, where: str) -> int:
    val = node.meta.get("val")
    if not hasattr(val, "shape"):
        raise SpecError(f"adapter {adapter!r}: {where} has no recorded shape", field="method")
    return int(val.shape[-1])


def _layer_output(layer: Layer, res: ResidualSite) -> fx.Node:
    return res.norm_after.output if res.norm_after is not None else res.add


def select_hidden(sm: StructureMap, points, includes_layer, adapter: str, label: str) -> list[HiddenSite]:
    """The sites at ``points`` (``layer_output`` of the layers ``includes_layer`` accepts); SpecError if none, or
    if a point is not defined on this model."""
    out = []
    layers = sorted(sm.layers, key=lambda layer: layer.index)
    for point in points:
        if point not in POINTS:
            raise SpecError(f"adapter {adapter!r}: unknown hidden-state point {point!r}; known: {list(POINTS)}",
                            field="method")
        if point == "embedding_output":
            res = layers[0].attention.residual if layers else None
            if res is None:
                raise SpecError(f"adapter {adapter!r}: no transformer layer with a residual stream was recognised, "
                                f"so the embedding output is unknown to {label} (see graphadapt inspect)",
                                field="method")
            out.append(HiddenSite(point, res.stream, _width(res.stream, adapter, "the embedding output")))
            continue
        for layer in layers:
            if not includes_layer(layer.index):
                continue
            res = layer.residual_sites().get("output")
            if res is None:
                raise SpecError(f"adapter {adapter!r}: layer {layer.index} has no recognised feed-forward residual "
                                f"point, so its output is unknown to {label}; see `graphadapt inspect`",
                                field="layers")
            if res.parallel_with is not None:
                raise SpecError(f"adapter {adapter!r}: layer {layer.index} is a parallel attention+FFN block "
                                f"(x + attn(ln x) + mlp(ln x)); {label} adapters have no defined placement there yet",
                                field="method")
            node = _layer_output(layer, res)
            out.append(HiddenSite(point, node, _width(node, adapter, f"layer {layer.index}'s output"), layer))
    if not out:
        raise SpecError(f"adapter {adapter!r}: no layer selected (model has {len(sm.layers)} recognised layers; "
                        "check `layers`)", field="layers")
    return out


def insert_hidden_adapter(gm: fx.GraphModule, ctx, adapter: str, method_name: str, sites: list[HiddenSite],
                          build) -> PassResult:
    """After each site's (live) node, ``call_module(target)(s, attention_mask)``; every other reader of ``s`` reads
    the module's result. ``build(site)`` makes the module (reused when already there: re-planning)."""
    mask = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == MASK_INPUT), None)
    records = []
    for s in sites:
        target = adapter_target(adapter, s.name)
        if submodule_or_none(gm, target) is None:
            mod = build(s)
            gm.add_submodule(target, mod)
            mod.train(gm.training)
        layer = s.layer.index if s.layer is not None else None
        if not ctx.attaches(adapter, s.name):
            records.append(AdapterRecord(adapter=adapter, method=method_name, site=s.name, target=target, kind=KIND,
                                         role=s.point, layer=layer, wired=False))
            continue
        out = ctx.live(s.node)
        with gm.graph.inserting_after(out):
            node = gm.graph.call_module(target, args=(out, mask))
        annotate(node, s.name, KIND)
        if "val" in out.meta:
            node.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
        records.append(AdapterRecord(adapter=adapter, method=method_name, site=s.name, target=target, kind=KIND,
                                     role=s.point, layer=layer))
    return PassResult(gm, bool(sites), {"sites": [s.name for s in sites]}, records)


@register_site_kind
class HiddenKind(SiteKindPlugin):
    """Hidden states between layers. Method protocol: ``points(spec)`` (a subset of :data:`POINTS`); the spec
    says ``includes_layer``; ``prepare(gm, adapter, spec, sites, seed) → extra build kwargs``;
    ``build(spec, adapter, site, seed, **extra)`` (``site.hidden``: the width) → a module called
    ``(h, attention_mask or None) → h'``. Several adapters at one point need a composition block, which this kind
    does not define (refused by the plan)."""

    kind = KIND
    phase = 15   # after residual points (it reads what they compute), before the embedding kind (20)
    combine = CombinePolicy.EXCLUSIVE

    def select(self, sm, spec, adapter, method):
        return select_hidden(sm, method.points(spec), spec.includes_layer, adapter, method.label)

    def key(self, site) -> str:
        return site.name

    def insert(self, gm, ctx, adapter, method, spec, sites, seed):
        extra = method.prepare(gm, adapter, spec, sites, seed)
        return insert_hidden_adapter(gm, ctx, adapter, method.name, sites,
                                     lambda s: method.build(spec, adapter, s, seed, **extra))


__all__ = ["HiddenKind", "HiddenSite", "KIND", "POINTS", "insert_hidden_adapter", "select_hidden"]
