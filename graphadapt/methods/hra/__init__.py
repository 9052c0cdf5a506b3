"""HRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = HRAModule(x, y, W, b) = linear(x Hᵀ, W, b)`` with ``H`` a
product of Householder reflections. Mergeable (``W' = W H``).

Init (PEFT's): ``init_weights=True``: kaiming-uniform(a=√5) on half the columns, each repeated twice (H = I; an odd
``r`` falls back to all columns, as PEFT warns); ``False``: kaiming-uniform columns. Drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import HRAModule
from .peft import peft_hra_spec, peft_key
from .spec import HRA


@register
class HRAMethod(LinearSiteMethod):
    name = "hra"
    spec_class = HRA
    peft_type = "HRA"

    def build(self, spec: HRA, adapter, site, seed, weight=None):
        check_plain_site("HRA", adapter, site)
        mod = HRAModule(site.in_features, site.out_features, r=spec.r, apply_GS=spec.apply_GS,
                        fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice, total_out=site.total_out,
                        out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            if spec.init_weights and spec.r % 2 == 0:
                half = torch.zeros(site.in_features, spec.r // 2)
                kaiming_uniform_(half, math.sqrt(5), g)
                mod.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))
            else:
                kaiming_uniform_(mod.hra_u, math.sqrt(5), g)
        return mod

    def peft_spec(self, config, targets):
        return peft_hra_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["HRA", "HRAMethod", "HRAModule"]
