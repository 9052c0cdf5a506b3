"""Activation (gradient) checkpointing per transformer layer of a captured graph.

    graph ──label nodes by layer (nn_module_stack ⊂ the recognised layer's module path)──▶
    contiguous segments ──torch.fx split_module──▶ one submodule per segment
    ──layer segments called through torch.utils.checkpoint (non-reentrant)──▶ derived module

The derived module shares every parameter, buffer and adapter module of the graph it was cut
from (the split keeps references, not copies), so gradients land on the same ``Parameter``
objects. Only the activations inside a layer are dropped after the forward and recomputed in
the backward (RNG state preserved: dropout masks are the same), so gradients are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from .errors import GraphAdaptError

__all__ = ["Checkpointed", "checkpointed_module", "node_layers"]


class Checkpointed(nn.Module):
    """Calls ``inner`` through :func:`torch.utils.checkpoint.checkpoint` when gradients are recorded."""

    def __init__(self, inner: nn.Module, options: dict[str, Any] | None = None):
        super().__init__()
        self.inner = inner
        self.options = {**(options or {}), "use_reentrant": False}

    def forward(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(self.inner, *args, **self.options)
        return self.inner(*args)


def _stack_paths(node: fx.Node) -> list[str]:
    return [str(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]


def node_layers(gm: fx.GraphModule, layer_paths: list[str]) -> dict[fx.Node, int]:
    """``{node: layer index}`` for the nodes of each layer's region (first to last node of the layer,
    in graph order); inserted nodes without metadata (adapter calls) take their inputs' layer."""
    prefixes = [(i, p) for i, p in enumerate(layer_paths)]
    label: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        paths = _stack_paths(n)
        hit = None
        for i, p in prefixes:
            if any(s == p or s.startswith(p + ".") for s in paths):
                hit = i
        if hit is None and not paths:  # inserted (adapter) node: its inputs' layer
            ins = [label[a] for a in n.all_input_nodes if a in label]
            hit = max(ins) if ins else None
        if hit is not None:
            label[n] = hit
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    for n, i in label.items():
        first[i] = min(first.get(i, order[n]), order[n])
        last[i] = max(last.get(i, order[n]), order[n])
    out: dict[fx.Node, int] = {}
    spans = sorted((first[i], last[i], i) for i in first)
    for (a, b, i), nxt in zip(spans, spans[1:] + [None]):
        if nxt is not None and nxt[0] <= b:
            raise GraphAdaptError(f"layers {layer_paths[i]!r} and {layer_paths[nxt[2]]!r} interleave in the graph; "
                                  "gradient checkpointing needs each layer's operations to be contiguous")
    for n, k in order.items():
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        for a, b, i in spans:
            if a <= k <= b:
                out[n] = i
                break
    return out


def _computed_reads_inside(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (a copy of its graph when anything changes) with every ``get_attr`` of a *computed* tensor — a
    property of a module rather than a registered parameter or buffer (a packed 4-bit base dequantizing its
    weight) — rewritten as ``getattr(module, name)`` at its use. ``split_module`` passes tensor ``get_attr``s
    into a segment as inputs, read by the parent before the checkpointed call: a checkpoint keeps its inputs,
    so every computed weight would stay alive until the backward. Read inside, it is recomputed instead."""
    import copy

    def computed(target: str) -> bool:
        owner, _, leaf = target.rpartition(".")
        try:
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            return False
        return (leaf not in mod._parameters and leaf not in mod._buffers and leaf not in mod._modules
                and isinstance(getattr(type(mod), leaf, None), property))

    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.target, str) and computed(n.target)]
    if not reads:
        return gm
    graph = copy.deepcopy(gm.graph)
    order = {x: i for i, x in enumerate(graph.nodes)}
    for n in [n for n in graph.nodes if n.op == "get_attr" and isinstance(n.target, str) and computed(n.target)]:
        owner, _, leaf = n.target.rpartition(".")
        first = min(n.users, key=order.get)      # one read per weight, right before its first use
        with graph.inserting_before(first):
            mod = graph.get_attr(owner)
            read = graph.call_function(getattr, (mod, leaf))
        read.meta = {k: v for k, v in first.meta.items() if k == "nn_module_stack"}   # in its user's layer
        n.replace_all_uses_with(read)
        graph.erase_node(n)
    out = fx.GraphModule(gm, graph)
    out.graph._codegen = gm.graph._codegen
    out.recompile()
    return out


def checkpointed_module(gm: fx.GraphModule, layer_paths: list[str], options: dict | None = None) -> fx.GraphModule:
    """A module computing what ``gm`` computes, each layer recomputed in the backward pass."""
    if len(set(layer_paths)) != len(layer_paths) or not all(layer_paths):
        raise GraphAdaptError("gradient checkpointing needs one module per layer; this model's layers share "
                              f"module paths {layer_paths} (e.g. ALBERT's shared layers)")
    gm = _computed_reads_inside(gm)
    layers = node_layers(gm, layer_paths)
    segment: dict[fx.Node, int] = {}
    current, seg, kinds = object(), -1, {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        lab = layers.get(n)
        if lab != current:
            current, seg = lab, seg + 1
            kinds[seg] = lab
        segment[n] = seg
    split = split_module(gm, gm, lambda n: segment[n], keep_original_order=True)
    split.graph._codegen = gm.graph._codegen  # pytree in/out (ModelOutput), as the source returns
    split.recompile()
    for name, child in list(split.named_children()):
        if name.startswith("submod_") and kinds.get(int(name.split("_")[1])) is not None:
            setattr(split, name, Checkpointed(child, options))
    return split
