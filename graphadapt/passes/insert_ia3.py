"""Insert IA3 scaling vectors at linear sites.

before: ``y = linear(x, W, b)``                       (or GPT-2's ``addmm`` form; or a slice of
        a fused projection split afterwards)
after:  ``y' = call_module(adapters.<name>.<site>)(x, y, W, b)``; every former user of ``y``
        reads ``y'``. The module scales the output (``l ⊙ y``) or, for the spec's
        ``feedforward`` targets, the input (``linear(l ⊙ x, W, b)``); see
        :mod:`graphadapt.modules.ia3`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..init import adapter_generator, normal_, ones_
from ..modules.ia3 import IA3Module
from ..structure.types import LinearSite
from . import PassResult
from .insert_lora import insert_per_site


def insert_ia3(gm: fx.GraphModule, adapter_name: str, method, sites: list[LinearSite], seed: int,
               records: list) -> PassResult:
    """Insert one IA3 adapter (``method``: a :class:`graphadapt.spec.ia3.IA3`) at ``sites``.

    Sites sharing a name (one weight used at several places, ALBERT) get one module called at
    every use. ``init_ia3_weights=True``: ones (identity); ``False``: N(0, 1) (PEFT's
    ``torch.randn``) drawn from ``adapter_generator(seed, adapter_name, site)`` only.
    """
    def build(site: LinearSite, weight: torch.Tensor) -> IA3Module:
        mod = IA3Module(site.in_features, site.out_features, feedforward=method.is_feedforward(site),
                        fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
                        total_out=site.total_out, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if method.init_ia3_weights:
                ones_(mod.ia3_l)
            else:
                normal_(mod.ia3_l, 1.0, adapter_generator(seed, adapter_name, site.name))
        return mod

    return insert_per_site(gm, adapter_name, "ia3", sites, records, build)


__all__ = ["insert_ia3"]
