"""Insert adapter modules at the residual points of attention and feed-forward sub-blocks.

before (post-LN, BERT):  ``out = LN(h + in)``
after:                   ``out = call_module(adapters.<name>.<layer>.<pos>_adapter)(h, in, LN.w, LN.b)``
                         (the module applies the model's own LN where it needs to)
before (pre-LN, GPT-2/Llama/T5/ViT): ``out = in + h``   (the norm sits before the sub-block)
after:                   ``out = call_module(...)(h, in, None, None)``

``h`` is the sub-block output after its output projection and dropout; ``in`` the residual.
Positions: ``mh`` (after attention) and ``output`` (after the FFN). Cross-attention residuals
are not offered. What the module computes is the method's business; this pass does *where*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import SpecError
from ..structure.types import Layer, ResidualSite, StructureMap
from ..vocab import SiteKind, adapter_target
from . import AdapterRecord, InsertContext, PassResult, annotate, erase_dead, get_attr_node, submodule_or_none

KIND = SiteKind.RESIDUAL


@dataclass
class ResidualTarget:
    layer: Layer
    position: str          # "mh" | "output"
    site: ResidualSite

    @property
    def name(self) -> str:
        return f"{self.layer.module_path or f'layer{self.layer.index}'}.{self.position}_adapter"

    @property
    def hidden_size(self) -> int | None:
        b = self.site.branch
        return int(b.meta["val"].shape[-1]) if "val" in b.meta else None


def select_residual_points(sm: StructureMap, positions: tuple[str, ...], includes_layer: Callable[[int], bool],
                           adapter_name: str, method_label: str) -> list[ResidualTarget]:
    """The residual points at ``positions`` of the layers ``includes_layer`` accepts (SpecError if none)."""
    out: list[ResidualTarget] = []
    for layer in sm.layers:
        if not includes_layer(layer.index):
            continue
        res = layer.residual_sites()
        for pos in positions:
            if pos in res and res[pos].parallel_with is not None:
                raise SpecError(
                    f"adapter {adapter_name!r}: layer {layer.index} is a parallel attention+FFN block "
                    f"(x + attn(ln x) + mlp(ln x), as in GPT-J/GPT-NeoX/Phi); {method_label} adapters have no "
                    "defined placement there yet. Use LoRA on these models.", field="method")
            if pos in res:
                out.append(ResidualTarget(layer, pos, res[pos]))
    if not out:
        raise SpecError(
            f"adapter {adapter_name!r}: no residual point found for positions {list(positions)} in the selected "
            f"layers (model has {len(sm.layers)} recognised layers); see `graphadapt inspect`.",
            field="layers")
    return out


def reference_parameter(gm: fx.GraphModule, t: ResidualTarget) -> torch.Tensor:
    """A base parameter of ``t``'s layer: new modules take its dtype and device."""
    return gm.get_parameter(t.layer.attention.o.weight) if t.layer.attention.o else next(gm.parameters())


def insert_residual_adapter(gm: fx.GraphModule, ctx: InsertContext, adapter_name: str, method_name: str,
                            targets: list[ResidualTarget],
                            build: Callable[[ResidualTarget, int, object, torch.Tensor], nn.Module]) -> PassResult:
    """Replace each residual point by a call of ``build(target, hidden, norm, ref)`` (one module per target name;
    ``norm`` is the model's norm after the add or None, ``ref`` a base parameter giving dtype/device).

    A target name seen twice (a layer whose weights are shared, ALBERT), or already present (re-planning
    after ``set_active``), reuses the module. Where ``ctx`` says another party wires the site (a
    composition, or the one active adapter of several), the module is built but not wired.
    """
    records: list[AdapterRecord] = []
    for t in targets:
        site = t.site
        h = ctx.live(site.branch)
        hidden = h.meta["val"].shape[-1] if "val" in h.meta else None
        norm = site.norm_after
        target = adapter_target(adapter_name, t.name)
        if submodule_or_none(gm, target) is None:
            mod = build(t, int(hidden), norm, reference_parameter(gm, t))
            gm.add_submodule(target, mod)
            mod.train(gm.training)
        if not ctx.attaches(adapter_name, site_key(t)):  # a composition (or another adapter) is wired here
            records.append(AdapterRecord(adapter=adapter_name, method=method_name, site=t.name, target=target,
                                         kind=KIND, role=t.position, layer=t.layer.index,
                                         placement=site.placement, wired=False))
            continue
        wire_residual(gm, ctx, target, t)
        records.append(AdapterRecord(adapter=adapter_name, method=method_name, site=t.name, target=target,
                                     kind=KIND, role=t.position, layer=t.layer.index,
                                     placement=site.placement))
    return PassResult(gm, bool(targets), {"sites": [t.name for t in targets]}, records)


def wire_residual(gm: fx.GraphModule, ctx: InsertContext, target: str, t: ResidualTarget) -> fx.Node:
    """Replace ``t``'s residual point (``LN(h + r)`` or ``h + r``) by ``call_module(target)(h, r, LN.w, LN.b)``."""
    g = gm.graph
    site = t.site
    h, stream = ctx.live(site.branch), ctx.live(site.stream)
    norm = site.norm_after
    replaced = ctx.live(norm.output if norm is not None else site.add)
    ln_w = get_attr_node(gm, norm.weight) if norm is not None and norm.weight else None
    if ln_w is not None and norm.weight_offset:  # Gemma-style (offset + w) scale
        with g.inserting_after(ln_w):
            ln_w = g.call_function(torch.ops.aten.add.Tensor, (ln_w, norm.weight_offset))
    ln_b = get_attr_node(gm, norm.bias) if norm is not None and norm.bias else None
    with g.inserting_after(replaced):
        node = g.call_module(target, args=(h, stream, ln_w, ln_b))
    annotate(node, t.name, KIND)
    if "val" in replaced.meta:
        node.meta["val"] = replaced.meta["val"]
    replaced.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    ctx.replaced[replaced] = node
    erase_dead(gm, [replaced])
    return node


def site_key(t: ResidualTarget) -> str:
    return t.name


__all__ = ["KIND", "ResidualTarget", "insert_residual_adapter", "reference_parameter",
           "select_residual_points", "site_key", "wire_residual"]
