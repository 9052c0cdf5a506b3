"""C3A as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW`` block-circulant / in. Mergeable.
Init (PEFT's schemes): xavier-uniform by default, zeros with ``init_weights=True`` — drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, normal_, uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import C3AModule
from .spec import C3A, C3A_INITS

_KEY = peft_key_pattern(("c3a_kernel",))


@register
class C3AMethod(LinearSiteMethod):
    name = "c3a"
    spec_class = C3A
    peft_type = "C3A"

    def build(self, spec: C3A, adapter, site, seed, weight=None):
        refuse_expert_site("C3A", adapter, site)
        block = spec.block_size_at(site.name, getattr(site, "module_path", None))
        mod = C3AModule(site, block_size=block, dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        k, init = mod.c3a_kernel, spec.init_weights
        with torch.no_grad():
            if init == "gaussian":
                normal_(k, 1.0, g)
            elif init in ("xavier_uniform", False):
                a = math.sqrt(3.0) * math.sqrt(2.0 / (mod.in_features + mod.out_features))
                uniform_(k, -a, a, g)
            elif init == "kaiming_uniform":
                a = math.sqrt(1.0 / mod.in_features)
                uniform_(k, -a, a, g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "C3A")
        init = config.get("init_weights", "xavier_uniform")
        return C3A(block_size=config_number(config, "block_size", int), targets=targets,
                   block_size_pattern=dict(config.get("block_size_pattern") or {}),
                   init_weights=init if init in C3A_INITS else "xavier_uniform")

    def peft_export(self, spec: C3A, modules, records):
        return per_module_peft_export("C3A", {
            "peft_type": "C3A", "block_size": spec.block_size, "block_size_pattern": dict(spec.block_size_pattern),
            "bias": "none",
            "init_weights": "xavier_uniform"}, modules, records)

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["C3A", "C3AMethod", "C3AModule"]
