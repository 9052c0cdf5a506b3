"""Layer replication (PEFT's ``layer_replication``): a deeper model whose extra layers share base weights.

before: a model whose layer stack is one ``nn.ModuleList`` of ``config.num_hidden_layers`` layers
after:  a *new* model (the caller's is untouched) whose stack is the layers the map lists — ``[[0, 4], [2, 5]]``
        gives ``0 1 2 3 2 3 4`` — each copy with its own module objects and its own ``nn.Parameter`` objects that
        share storage with the original weights (no copy of the weights). torch.export names each copy's weights
        apart, so every copy is its own set of sites and gets its own adapters, as in PEFT.

Merging folds each copy's adapter into a new weight of its own (the copies' shared storage is never written:
in-place merges of a shared weight are refused by :mod:`graphadapt.merging`) — PEFT's ``merge_and_unload``
instead adds every copy's delta to the one shared weight.

The layer stack is found from the module tree, not from model classes: the ``nn.ModuleList`` of same-class
modules whose length is ``config.num_hidden_layers``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.nn as nn

from .errors import SpecError

MARK = "_graphadapt_layer_map"


def check_layer_map(layer_map, field: str = "layer_replication") -> tuple[tuple[int, int], ...]:
    """``[[start, end), ...]`` as a tuple of int pairs with ``0 <= start < end``; SpecError otherwise."""
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence) or not layer_map:
        raise SpecError(f"{field} must be a non-empty list of [start, end) layer ranges, e.g. [[0, 4], [2, 6]]; "
                        f"got {layer_map!r}", field=field)
    out = []
    for r in layer_map:
        if (isinstance(r, (str, bytes)) or not isinstance(r, Sequence) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r) or not 0 <= r[0] < r[1]):
            raise SpecError(f"{field}: each range is [start, end) with integers 0 <= start < end; got {r!r}",
                            field=field)
        out.append((int(r[0]), int(r[1])))
    return tuple(out)


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, list)`` of the model's layer stack: the ModuleList of same-class modules with
    ``config.num_hidden_layers`` entries (the longest such list when the config does not say)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    cands = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    if n is not None:
        cands = [(p, m) for p, m in cands if len(m) == n]
    else:
        longest = max((len(m) for _, m in cands), default=0)
        cands = [(p, m) for p, m in cands if len(m) == longest]
    if len(cands) != 1:
        found = ", ".join(f"{p} ({len(m)})" for p, m in cands) or "none"
        raise SpecError(f"layer_replication needs one layer stack: a ModuleList of {n or 'the most'} same-class "
                        f"layers; found {found}", field="layer_replication")
    return cands[0]


def replicate_layers(model: nn.Module, layer_map) -> nn.Module:
    """A new model with the layer stack replicated per ``layer_map`` (see the module docstring)."""
    layer_map = check_layer_map(layer_map)
    if getattr(model, MARK, None) is not None:
        raise SpecError(f"this model's layers are already replicated ({getattr(model, MARK)}); pass the original "
                        "model", field="layer_replication")
    path, _ = layer_stack(model)
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=dict(shared))        # new modules and config, the same tensors
    layers = twin.get_submodule(path)
    n = len(layers)
    bad = [r for r in layer_map if r[1] > n]
    if bad:
        raise SpecError(f"layer_replication range {list(bad[0])} goes past the model's {n} layers",
                        field="layer_replication")
    new = []
    for start, end in layer_map:
        for i in range(start, end):
            src = layers[i]
            memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in src.parameters()}
            memo.update({id(b): b for b in src.buffers()})
            clone = copy.deepcopy(src, memo=memo)
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    owner, _, leaf = path.rpartition(".")
    setattr(twin.get_submodule(owner) if owner else twin, leaf, nn.ModuleList(new))
    cfg = getattr(twin, "config", None)
    if cfg is not None:
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == n:
            cfg.layer_types = [types[i] for s, e in layer_map for i in range(s, e)]
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(new)
    setattr(twin, MARK, layer_map)
    return twin


__all__ = ["MARK", "check_layer_map", "layer_stack", "replicate_layers"]
