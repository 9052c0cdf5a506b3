"""Fold mergeable adapters into the base weights.

before: ``y' = call_module(adapter)(x, y, W, b)`` after ``y = op(x, W, b)``
after:  ``y = op(x, W', b')`` with ``(W', b') = adapter.fold(W, b)``; the call is gone, so the
        merged graph has exactly the base graph's operators.

The pass asks each module for its fold (``mergeable`` / ``fold(W, b[, base_weight])``), so any
method plugs in without changing it; a module whose forward reads the base weight
(``reads_base_weight``, e.g. DoRA's norm) and stays in the graph blocks folding into that weight. Several adapters on one weight fold in graph order.
Modules that cannot fold (bottleneck, gated LoRA, …) stay in the graph and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import MergeError
from ..vocab import adapter_of
from . import PassResult, adapter_call_nodes


@dataclass
class MergePlan:
    folded: list[str] = field(default_factory=list)                # module targets
    kept: dict[str, str] = field(default_factory=dict)             # target → reason
    new_values: dict[str, torch.Tensor] = field(default_factory=dict)   # param name → value
    nodes: list[fx.Node] = field(default_factory=list)


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return adapter_call_nodes(gm)


def _blocked_weights(gm: fx.GraphModule, nodes: list[fx.Node], names) -> dict[str, str]:
    """Weights that must not change because an active module that stays in the graph reads them
    (``reads_base_weight``: DoRA's norm and base term use ``W``): folding anything else into ``W``
    would alter its output."""
    blocked = {}
    for n in nodes:
        if n.meta.get("graphadapt", {}).get("kind") != "linear":
            continue
        mod = gm.get_submodule(str(n.target))
        stays = names is not None and adapter_of(str(n.target)) not in names
        reader = getattr(mod, "reads_base_weight", None)
        if reader and getattr(mod, "active", True) and stays:
            label = reader if isinstance(reader, str) else type(mod).__name__
            blocked[n.args[2].target] = (f"an active {label} adapter on the same weight ({n.target}) is not being "
                                         "merged and reads this weight; merge it too, or deactivate it")
    return blocked


def plan_merge(gm: fx.GraphModule, names=None, safe: bool = True) -> MergePlan:
    plan = MergePlan()
    nodes = adapter_nodes(gm)
    blocked = _blocked_weights(gm, nodes, names)
    folded_targets: set[str] = set()
    for n in nodes:
        target = str(n.target)
        adapter = adapter_of(target)
        if target in folded_targets:  # a module called at several uses of one shared weight folds once
            plan.nodes.append(n)
            continue
        mod = gm.get_submodule(target)
        if names is not None and adapter not in names:
            continue
        if not getattr(mod, "active", True):
            plan.kept[target] = "inactive adapter (activate it to merge it)"
            continue
        if n.meta.get("graphadapt", {}).get("kind") != "linear" or not getattr(mod, "mergeable", False):
            why = getattr(mod, "merge_refusal", None) or (
                f"{type(mod).__name__} depends on the input and cannot fold into a weight")
            plan.kept[target] = why
            continue
        w_node, b_node = n.args[2], n.args[3]
        if w_node.target in blocked:
            plan.kept[target] = blocked[w_node.target]
            continue
        w = plan.new_values.get(w_node.target)
        if w is None:
            w = gm.get_parameter(w_node.target).detach()
        b = None
        if b_node is not None:
            b = plan.new_values.get(b_node.target)
            if b is None:
                b = gm.get_parameter(b_node.target).detach()
        base_w = gm.get_parameter(w_node.target).detach()
        with torch.no_grad():
            # DoRA's norm comes from the un-merged weight even when folded after another adapter
            w2, b2 = mod.fold(w, b, base_weight=base_w) if _takes_base(mod) else mod.fold(w, b)
        if b_node is None and b2 is not None:
            plan.kept[target] = "its fold creates a bias the base layer does not have"
            continue
        if safe:
            bad = [nm for nm, t in ((w_node.target, w2), (getattr(b_node, "target", None), b2))
                   if t is not None and not torch.isfinite(t).all()]
            if bad:
                raise MergeError(f"merging {target} gives non-finite values in {bad}; nothing was "
                                 "changed. Check the adapter weights (or pass safe=False).")
        plan.new_values[w_node.target] = w2
        if b_node is not None:
            plan.new_values[b_node.target] = b2
        plan.folded.append(target)
        folded_targets.add(target)
        plan.nodes.append(n)
    return plan


def _takes_base(mod) -> bool:
    import inspect

    try:
        return "base_weight" in inspect.signature(mod.fold).parameters
    except (TypeError, ValueError):
        return False


def apply_merge(gm: fx.GraphModule, plan: MergePlan) -> PassResult:
    for n in plan.nodes:
        y = n.args[1]
        n.replace_all_uses_with(y)
        gm.graph.erase_node(n)
    return PassResult(gm, bool(plan.nodes), {"folded": plan.folded, "kept": plan.kept})
