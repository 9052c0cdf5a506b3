"""AdaLoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), the rank allocator and orthogonality
regulariser for training (:mod:`.allocator`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = AdaLoRAModule(x, y, W, b) = y + s/(r₀+1e-5)·B(A⊙E)·dropout(x)``.
Init (PEFT's): ``E = 0``, ``A, B ~ N(0, 0.02²)``, drawn from the site's generator. Mergeable.
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from .allocator import RankAllocator, orth_regularization
from .module import AdaLoRAModule
from .peft import peft_adalora_spec, peft_key
from .spec import AdaLoRA


@register
class AdaLoRAMethod(LinearSiteMethod):
    name = "adalora"
    spec_class = AdaLoRA
    peft_type = "ADALORA"

    def build(self, spec: AdaLoRA, adapter, site, seed, weight=None):
        if getattr(site, "num_experts", None):
            from graphadapt.errors import SpecError

            raise SpecError(f"adapter {adapter!r}: AdaLoRA is not available on the expert weights of {site.name}",
                            field="targets")
        kept = spec.kept(site.module_path) if site.out_slice is None and getattr(site, "out_rows", None) is None \
            else spec.kept(site.name)
        r = spec.init_r if kept is None else sum(kept)
        mod = AdaLoRAModule(site.in_features, site.out_features, r=r, ranknum=spec.init_r, scaling=spec.scaling,
                            dropout=spec.dropout, fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
                            total_out=site.total_out, out_rows=getattr(site, "out_rows", None), dtype=weight.dtype,
                            device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            normal_(mod.svd_A, 0.02, g)
            normal_(mod.svd_B, 0.02, g)
        return mod

    def peft_spec(self, config, targets):
        return peft_adalora_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["AdaLoRA", "AdaLoRAMethod", "AdaLoRAModule", "RankAllocator", "orth_regularization"]
