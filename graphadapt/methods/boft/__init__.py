"""BOFT as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = BOFTModule(x, y, W, b) = s ⊙ (x M Wᵀ) + b`` with ``M`` a
product of butterfly factors. Mergeable (``W' = s ⊙ W Mᵀ``).

Init: ``init_weights=True``: zero block parameters (identity) and unit scale; ``False``: N(0, 0.1²) and
N(1, 0.1²) (PEFT's), drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import BOFTModule
from .peft import peft_boft_spec, peft_key, saved_factors
from .spec import BOFT


@register
class BOFTMethod(LinearSiteMethod):
    name = "boft"
    spec_class = BOFT
    peft_type = "BOFT"

    def build(self, spec: BOFT, adapter, site, seed, weight=None):
        check_plain_site("BOFT", adapter, site)
        num, size = spec.geometry(site.in_features, f"adapter {adapter!r} at {site.name}")
        mod = BOFTModule(site.in_features, site.out_features, factors=spec.boft_n_butterfly_factor, block_num=num,
                         block_size=size, fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
                         total_out=site.total_out, out_rows=getattr(site, "out_rows", None), dtype=weight.dtype,
                         device=weight.device)
        if not spec.init_weights:
            g = adapter_generator(seed, adapter, site.name)
            with torch.no_grad():
                normal_(mod.boft_R, 0.1, g)
                normal_(mod.boft_s, 0.1, g, mean=1.0)
        return mod

    def peft_spec(self, config, targets):
        return peft_boft_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)

    def peft_read(self, model, config, weights, name, directory):
        saved_factors(config, weights)   # then the per-module reader, with the factor count the tensors have
        return None


__all__ = ["BOFT", "BOFTMethod", "BOFTModule"]
