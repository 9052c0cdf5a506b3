"""Graph-level pieces of composition: the composition modules' place (``adapters._compose.<site>``), the
fusion layers (``adapters.<fusion name>.<site>``, trainable, reused when the model is re-planned) and the
input replication a ``Parallel`` block needs. Wiring a composition at a site is the site kind's business
(:func:`graphadapt.sites.compose.insert_compositions`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..init import adapter_generator
from ..passes import PassResult, submodule_or_none
from ..vocab import adapter_target
from .fusion import FusionLayer

COMPOSE = "_compose"


def fusion_layer(gm, name: str, key: str, config: dict, hidden: int, seed: int, dropout: float, ref: torch.Tensor):
    """The fusion layer ``name`` at site ``key`` (created, seeded, on ``ref``'s dtype/device, if absent)."""
    target = adapter_target(name, key)
    mod = submodule_or_none(gm, target)
    if mod is None:
        mod = FusionLayer(hidden, config, dropout, adapter_generator(seed, name, key), dtype=ref.dtype,
                          device=ref.device)
        mod.train(gm.training)
        gm.add_submodule(target, mod)
    return mod


def replicate_inputs(gm: fx.GraphModule, channels: int) -> PassResult:
    """Repeat every batched tensor input ``channels`` times along the batch (``[x; x; …]``)."""
    g = gm.graph
    done = []
    for ph in [n for n in g.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        users = list(ph.users)
        with g.inserting_after(ph):
            rep = g.call_function(torch.ops.aten.cat.default, ([ph] * channels, 0))
        for u in users:
            u.replace_input_with(ph, rep)
        done.append(ph.target)
    return PassResult(gm, bool(done), {"replicated": done})


__all__ = ["COMPOSE", "fusion_layer", "replicate_inputs"]
