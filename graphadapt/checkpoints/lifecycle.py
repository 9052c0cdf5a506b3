"""Adapter lifecycle helpers for :class:`~graphadapt.model.AdaptedModel` (kept out of model.py)."""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import GraphAdaptError
from ..vocab import adapter_prefix
from ..concurrency import state_lock
from .trainable import trainable_module_keys


@contextlib.contextmanager
def adapters_disabled(adapted):
    """Inside the block the model computes the base model: adapter modules pass their input through (a
    composition: the captured base graph runs instead) and ``modules_to_save`` use the base's own
    weights. Everything is restored on exit, also on an exception."""
    if adapted.is_merged:
        raise GraphAdaptError("disable_adapters() on a merged model: the adapters are folded into the base "
                              "weights; unmerge() first")
    mods = [m for n, m in adapted.named_modules() if n.startswith(adapter_prefix()) and hasattr(m, "active")]
    saved = [m.active for m in mods]
    graph = None
    swapped = []
    lock = state_lock(adapted)  # forwards in other threads see the state before or after each flip
    try:
        with lock.write():
            for m in mods:
                m.active = False
            if adapted.spec.composition is not None:  # composition modules have no pass-through: run the base graph
                graph = adapted.graph
                adapted.graph = adapted.snapshot_graph(adapted._planning.base_graph)
                adapted.recompile()
                super(type(adapted), adapted).train(adapted.training)  # the base graph's dropout flags
            src = dict(adapted.__dict__["_source_model"].named_parameters(remove_duplicate=False)) \
                if adapted.__dict__.get("_source_model") is not None else {}
            for key in trainable_module_keys(adapted):
                if key in src:
                    owner, _, leaf = key.rpartition(".")
                    mod = adapted.get_submodule(owner)
                    swapped.append((mod, leaf, mod._parameters[leaf]))
                    mod._parameters[leaf] = nn.Parameter(src[key].detach(), requires_grad=False)
        yield adapted
    finally:
        with lock.write():
            for mod, leaf, p in swapped:
                mod._parameters[leaf] = p
            if graph is not None:
                adapted.graph = graph
                adapted.recompile()
            for m, flag in zip(mods, saved):
                m.active = flag


__all__ = ["adapters_disabled"]
