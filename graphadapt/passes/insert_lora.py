"""Insert LoRA branches at linear sites.

before: ``y = linear(x, W, b)``                       (or GPT-2's ``addmm`` form; or a fused
        projection whose output is split afterwards)
after:  ``y' = call_module(adapters.<name>.<site>)(x, y, W, b)``; every former user of ``y``
        reads ``y'``. The module adds ``s·B·A·dropout(x)`` (into its slice for fused QKV).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..init import adapter_generator, init_lora_
from ..modules.lora import LoRAModule
from ..structure.types import LinearSite
from . import PassResult, get_attr_node


def _weight_args(gm: fx.GraphModule, site: LinearSite) -> tuple[fx.Node, fx.Node | None]:
    w = get_attr_node(gm, site.weight)
    b = get_attr_node(gm, site.bias) if site.bias else None
    return w, b


def insert_call(gm: fx.GraphModule, target: str, module: nn.Module, site: LinearSite, add: bool = True) -> fx.Node:
    """Add ``module`` under ``target`` (unless already there) and rewire ``site.output`` through it."""
    if add:
        gm.add_submodule(target, module)
    w, b = _weight_args(gm, site)
    y = site.output
    # Stack after the adapters already on this output, so they run in insertion (spec) order:
    # m2(x, m1(x, y0, W, b), W, b). DoRA rescales its incoming y, so order matters (as in PEFT).
    while True:
        tail = [u for u in y.users if u.op == "call_module" and u.args[1] is y
                and u.meta.get("graphadapt", {}).get("kind") == "linear"]
        if not tail:
            break
        y = tail[0]
    with gm.graph.inserting_after(y):
        node = gm.graph.call_module(target, args=(site.input, y, w, b))
    y.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    node.meta["graphadapt"] = {"site": site.name, "kind": "linear"}
    if "val" in y.meta:
        node.meta["val"] = y.meta["val"]
    return node


def insert_lora(gm: fx.GraphModule, adapter_name: str, method, sites: list[LinearSite], seed: int,
                records: list) -> PassResult:
    """Insert one LoRA adapter (``method``: a :class:`graphadapt.LoRA`) at ``sites``."""
    def build(site: LinearSite, weight: torch.Tensor) -> nn.Module:
        mod = LoRAModule(
            site.in_features, site.out_features, r=method.r, alpha=method.alpha, dropout=method.dropout,
            use_rslora=method.use_rslora, use_dora=method.use_dora, use_gating=method.use_gating,
            fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
            total_out=site.total_out, dtype=weight.dtype, device=weight.device)
        gen = adapter_generator(seed, adapter_name, site.name)
        with torch.no_grad():
            new_w = init_lora_(mod, method.init, gen, base_weight=weight.detach())
        if new_w is not None:  # PiSSA moves the principal part of W into the adapter
            _replace_parameter(gm, site.weight, new_w)
        return mod

    return insert_per_site(gm, adapter_name, "lora", sites, records, build)


def insert_per_site(gm: fx.GraphModule, adapter_name: str, method_name: str, sites: list[LinearSite],
                    records: list, build) -> PassResult:
    """Install ``build(site, base_weight)`` at every linear site, one module per site name.

    Sites sharing a name use one weight at several places (ALBERT's shared layers): they get
    one module, called at every use, as wrapping the shared ``nn.Linear`` would.
    """
    groups: dict[str, list[LinearSite]] = {}
    for site in sites:
        groups.setdefault(site.name, []).append(site)
    for name, group in groups.items():
        site = group[0]
        mod = build(site, gm.get_parameter(site.weight))
        target = f"adapters.{adapter_name}.{name}"
        mod.train(gm.training)
        for i, s in enumerate(group):
            insert_call(gm, target, mod, s, add=i == 0)
            records.append({"adapter": adapter_name, "method": method_name, "site": s.name, "target": target,
                            "role": s.role, "layer": s.layer, "weight": s.weight,
                            "bias": s.bias, "layout": s.layout})
    return PassResult(gm, bool(sites), {"sites": [s.name for s in sites]})


def _replace_parameter(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Install a new Parameter object (never writes into storage shared with the caller's model)."""
    owner, _, leaf = qualname.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = mod._parameters[leaf]
    mod._parameters[leaf] = nn.Parameter(value.detach().to(old.dtype).clone(), requires_grad=old.requires_grad)
