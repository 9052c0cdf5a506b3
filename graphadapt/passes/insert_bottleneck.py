"""Insert bottleneck adapters at the residual points of attention and feed-forward sub-blocks.

before (post-LN, BERT):  ``out = LN(h + in)``
after:                   ``out = call_module(adapters.<name>.<layer>.<pos>_adapter)(h, in, LN.w, LN.b)``
                         (the module applies the model's own LN where AdapterHub does)
before (pre-LN, GPT-2/Llama/T5/ViT): ``out = in + h``   (the norm sits before the sub-block)
after:                   ``out = call_module(...)(h, in, None, None)`` — AdapterHub's behaviour
                         with ``layer_norm=None``: the adapter reads the sub-block output ``h``
                         and the residual is added after it, so the stream stays un-normalised.

``h`` is the sub-block output after its output projection and dropout; ``in`` the residual.
Positions: ``mh`` (after attention, AdapterHub's ``mh_adapter``) and ``output`` (after the FFN,
``output_adapter``). Cross-attention residuals are not adapted (AdapterHub's bottleneck
configs have no cross-attention position by default).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
import torch.fx as fx

from ..errors import SpecError
from ..init import adapter_generator
from ..modules.bottleneck import BottleneckAdapter
from ..structure.types import Layer, ResidualSite, StructureMap
from . import PassResult, erase_dead, get_attr_node


@dataclass
class ResidualTarget:
    layer: Layer
    position: str          # "mh" | "output"
    site: ResidualSite

    @property
    def name(self) -> str:
        return f"{self.layer.module_path or f'layer{self.layer.index}'}.{self.position}_adapter"


def select_residual_sites(sm: StructureMap, method, adapter_name: str) -> list[ResidualTarget]:
    out: list[ResidualTarget] = []
    wanted = [p for p, on in (("mh", method.mh_adapter), ("output", method.output_adapter)) if on]
    for layer in sm.layers:
        if not method.includes_layer(layer.index):
            continue
        res = layer.residual_sites()
        for pos in wanted:
            if pos in res:
                out.append(ResidualTarget(layer, pos, res[pos]))
    if not out:
        raise SpecError(
            f"adapter {adapter_name!r}: no residual point found for positions {wanted} in the selected "
            f"layers (model has {len(sm.layers)} recognised layers); see `graphadapt inspect`.",
            field="layers")
    return out


_MODULE_PARAMS = set(inspect.signature(BottleneckAdapter.__init__).parameters) - {"self"}


def module_kwargs(method, layer_index: int) -> dict:
    kw = {f.name: getattr(method, f.name) for f in fields(method) if f.name in _MODULE_PARAMS}
    kw["reduction_factor"] = method.reduction_for(layer_index)
    return kw


def insert_bottleneck(gm: fx.GraphModule, adapter_name: str, method, targets: list[ResidualTarget],
                      seed: int, records: list) -> PassResult:
    g = gm.graph
    shared = None
    for t in targets:
        site = t.site
        h, stream = site.branch, site.stream
        hidden = h.meta["val"].shape[-1] if "val" in h.meta else None
        ref = gm.get_parameter(t.layer.attention.o.weight) if t.layer.attention.o else next(gm.parameters())
        norm = site.norm_after
        gen = adapter_generator(seed, adapter_name, t.name)
        kw = module_kwargs(method, t.layer.index)
        mod = BottleneckAdapter(
            int(hidden), **kw, shared=shared,
            norm_kind=norm.kind if norm is not None else None,
            norm_eps=norm.eps if norm is not None else 1e-12,
            generator=gen, dtype=ref.dtype, device=ref.device)
        if shared is None and getattr(mod, "owns_shared", False):
            shared = mod.shared
        target = f"adapters.{adapter_name}.{t.name}"
        gm.add_submodule(target, mod)
        mod.train(gm.training)
        replaced = norm.output if norm is not None else site.add
        ln_w = get_attr_node(gm, norm.weight) if norm is not None and norm.weight else None
        ln_b = get_attr_node(gm, norm.bias) if norm is not None and norm.bias else None
        with g.inserting_after(replaced):
            node = g.call_module(target, args=(h, stream, ln_w, ln_b))
        node.meta["graphadapt"] = {"site": t.name, "kind": "residual"}
        if "val" in replaced.meta:
            node.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
        erase_dead(gm, [replaced])
        records.append({"adapter": adapter_name, "method": "bottleneck", "site": t.name, "target": target,
                        "role": t.position, "layer": t.layer.index,
                        "placement": site.placement})
    return PassResult(gm, bool(targets), {"sites": [t.name for t in targets]})
