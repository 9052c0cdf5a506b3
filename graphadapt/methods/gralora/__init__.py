"""GraLoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + dropout(x) ΔWᵀ``, ``ΔW`` a k×k grid of rank-r/k blocks (+ a
hybrid LoRA). Mergeable. Init (PEFT's): each block's A Kaiming-uniform(a=√5) as an ``[r, in/k]`` matrix, B zero
(``init_weights=False``: Kaiming-uniform too), block by block, then the hybrid A (and B) — drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import GraLoRAModule
from .spec import GraLoRA

_KEY = peft_key_pattern(("gralora_A_general", "gralora_B_general", "gralora_A", "gralora_B"))


@register
class GraLoRAMethod(LinearSiteMethod):
    name = "gralora"
    spec_class = GraLoRA
    peft_type = "GRALORA"

    def build(self, spec: GraLoRA, adapter, site, seed, weight=None):
        refuse_expert_site("GraLoRA", adapter, site)
        mod = GraLoRAModule(site, r=spec.r, k=spec.k, alpha=spec.alpha, hybrid_r=spec.hybrid_r, dropout=spec.dropout,
                            dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            for n in range(spec.k):   # PEFT draws A as [r, in/k] and B as [out/k, r], then transposes
                a = torch.empty(spec.r, mod.in_features // spec.k)
                kaiming_uniform_(a, math.sqrt(5), g)
                mod.gralora_A[n].copy_(a.T)
                if not spec.init_weights:
                    b = torch.empty(mod.out_features // spec.k, spec.r)
                    kaiming_uniform_(b, math.sqrt(5), g)
                    mod.gralora_B[n].copy_(b.T)
            if spec.hybrid_r:
                kaiming_uniform_(mod.gralora_A_general, math.sqrt(5), g)
                if not spec.init_weights:
                    kaiming_uniform_(mod.gralora_B_general, math.sqrt(5), g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "GraLoRA")
        return GraLoRA(r=config_number(config, "r", int), alpha=config_number(config, "alpha"),
                       k=config_number(config, "gralora_k", int, default=2),
                       hybrid_r=config_number(config, "hybrid_r", int, default=0),
                       dropout=config_number(config, "gralora_dropout", default=0.0), targets=targets)

    def peft_export(self, spec: GraLoRA, modules, records):
        return per_module_peft_export("GraLoRA", {
            "peft_type": "GRALORA", "r": spec.r, "alpha": spec.alpha, "gralora_k": spec.k, "hybrid_r": spec.hybrid_r,
            "gralora_dropout": spec.dropout, "fan_in_fan_out": False, "init_weights": True, "bias": "none"},
            modules, records, rename={"gralora_A_general": "gralora_A_general.weight",
                                      "gralora_B_general": "gralora_B_general.weight"})

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["GraLoRA", "GraLoRAMethod", "GraLoRAModule"]
