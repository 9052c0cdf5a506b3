"""DeLoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = DeLoRAModule(x, y, W, b) = y + x ΔWᵀ`` with ``ΔW`` a
normalised low-rank update of strength λ. Mergeable (``W' = W + ΔW``).

Init (PEFT's): kaiming-uniform(a=√5) A, zero B (kaiming-uniform B with ``init_weights=False``), λ =
``delora_lambda``, the column norms of the base weight; drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import DeLoRAModule
from .peft import peft_delora_spec, peft_key
from .spec import DeLoRA


@register
class DeLoRAMethod(LinearSiteMethod):
    name = "delora"
    spec_class = DeLoRA
    peft_type = "DELORA"

    def build(self, spec: DeLoRA, adapter, site, seed, weight=None):
        check_plain_site("DeLoRA", adapter, site)
        r, lam = spec.rank_lambda(site.name, getattr(site, "module_path", None))
        mod = DeLoRAModule(site.in_features, site.out_features, r=r, dropout=spec.dropout,
                           fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice, total_out=site.total_out,
                           out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            kaiming_uniform_(mod.delora_A, math.sqrt(5), g)
            if not spec.init_weights:
                kaiming_uniform_(mod.delora_B, math.sqrt(5), g)
            mod.delora_lambda.fill_(lam)
            mod.delora_w_norm.copy_(mod._rows(weight.detach()).norm(dim=0))
        return mod

    def peft_spec(self, config, targets):
        return peft_delora_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["DeLoRA", "DeLoRAMethod", "DeLoRAModule"]
