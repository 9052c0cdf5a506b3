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
from ..modules.phm import PHMConfig, init_shared_phm_parameters
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
            if pos in res and res[pos].parallel_with is not None:
                raise SpecError(
                    f"adapter {adapter_name!r}: layer {layer.index} is a parallel attention+FFN block "
                    "(x + attn(ln x) + mlp(ln x), as in GPT-J/GPT-NeoX/Phi); bottleneck adapters have no "
                    "defined placement there yet. Use LoRA on these models.", field="method")
            if pos in res:
                out.append(ResidualTarget(layer, pos, res[pos]))
    for t in out:
        hidden = int(t.site.branch.meta["val"].shape[-1]) if "val" in t.site.branch.meta else None
        if hidden is None:
            continue
        size = max(1, int(hidden // method.reduction_for(t.layer.index)))
        if method.phm_layer and (size % method.phm_dim or hidden % method.phm_dim):
            raise SpecError(
                f"adapter {adapter_name!r}: PHM layers need hidden size ({hidden}) and bottleneck size "
                f"({size} = {hidden} // reduction_factor {method.reduction_for(t.layer.index)}) divisible by "
                f"phm_dim={method.phm_dim}; lower reduction_factor or change phm_dim.", field="reduction_factor")
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


def _submodule(gm: fx.GraphModule, target: str):
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def insert_bottleneck(gm: fx.GraphModule, adapter_name: str, method, targets: list[ResidualTarget],
                      seed: int, records: list) -> PassResult:
    g = gm.graph
    shared = None
    # a later site (of this or a later bottleneck pass) may read a node an earlier one replaced
    replaced_by: dict[fx.Node, fx.Node] = gm.meta.setdefault("graphadapt_replaced", {})

    def live(n):
        while n in replaced_by:
            n = replaced_by[n]
        return n

    for t in targets:
        site = t.site
        h, stream = live(site.branch), live(site.stream)
        hidden = h.meta["val"].shape[-1] if "val" in h.meta else None
        ref = gm.get_parameter(t.layer.attention.o.weight) if t.layer.attention.o else next(gm.parameters())
        norm = site.norm_after
        target = f"adapters.{adapter_name}.{t.name}"
        existing = _submodule(gm, target)
        gen = adapter_generator(seed, adapter_name, t.name)
        kw = module_kwargs(method, t.layer.index)
        if shared is None and method.phm_layer and (method.shared_phm_rule or method.shared_W_phm):
            # Compacter shares PHM rules (and optionally W) across every layer of one adapter
            cfg = PHMConfig(**{f.name: getattr(method, f.name) for f in fields(PHMConfig)})
            size = max(1, int(int(hidden) // kw["reduction_factor"]))
            shared = init_shared_phm_parameters(
                int(hidden), size, cfg, generator=adapter_generator(seed, adapter_name, "shared_phm"),
                init_weights=method.init_weights, dtype=ref.dtype, device=ref.device)
            gm.add_submodule(f"adapters.{adapter_name}.shared_phm", shared)
        if existing is None:
            mod = BottleneckAdapter(
                int(hidden), **kw, shared=shared,
                norm_kind=norm.kind if norm is not None else None,
                norm_eps=norm.eps if norm is not None else 1e-12,
                generator=gen, dtype=ref.dtype, device=ref.device)
            gm.add_submodule(target, mod)
            mod.train(gm.training)
        # else: a layer whose weights are shared (ALBERT) shares its adapter too
        replaced = norm.output if norm is not None else site.add
        ln_w = get_attr_node(gm, norm.weight) if norm is not None and norm.weight else None
        if ln_w is not None and norm.weight_offset:  # Gemma-style (offset + w) scale
            with g.inserting_after(ln_w):
                ln_w = g.call_function(torch.ops.aten.add.Tensor, (ln_w, norm.weight_offset))
        ln_b = get_attr_node(gm, norm.bias) if norm is not None and norm.bias else None
        with g.inserting_after(replaced):
            node = g.call_module(target, args=(h, stream, ln_w, ln_b))
        node.meta["graphadapt"] = {"site": t.name, "kind": "residual"}
        if "val" in replaced.meta:
            node.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
        replaced_by[replaced] = node
        erase_dead(gm, [replaced])
        records.append({"adapter": adapter_name, "method": "bottleneck", "site": t.name, "target": target,
                        "role": t.position, "layer": t.layer.index,
                        "placement": site.placement})
    return PassResult(gm, bool(targets), {"sites": [t.name for t in targets]})
