"""LoHa as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW = (alpha/r)·(W1a W1b) ⊙ (W2a W2b)``.
Mergeable (``W + ΔW``). Init (PEFT's): W1a, W1b, W2a Kaiming-uniform(a=√5), W2b zero (``init_weights=False``:
Kaiming-uniform too), drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import LoHaModule
from .spec import LoHa

_KEY = peft_key_pattern(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"))


@register
class LoHaMethod(LinearSiteMethod):
    name = "loha"
    spec_class = LoHa
    peft_type = "LOHA"

    def build(self, spec: LoHa, adapter, site, seed, weight=None):
        refuse_expert_site("LoHa", adapter, site)
        r, alpha = spec.rank_alpha(site.name, getattr(site, "module_path", None))
        mod = LoHaModule(site, r=r, alpha=alpha, rank_dropout=spec.rank_dropout,
                         module_dropout=spec.module_dropout, dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            for p in (mod.hada_w1_a, mod.hada_w1_b, mod.hada_w2_a) + (() if spec.init_weights else (mod.hada_w2_b,)):
                kaiming_uniform_(p, math.sqrt(5), g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "LoHa")
        return LoHa(r=config_number(config, "r", int), alpha=config_number(config, "alpha"),
                    rank_pattern=dict(config.get("rank_pattern") or {}),
                    alpha_pattern=dict(config.get("alpha_pattern") or {}),
                    rank_dropout=config_number(config, "rank_dropout", default=0.0),
                    module_dropout=config_number(config, "module_dropout", default=0.0), targets=targets)

    def peft_export(self, spec: LoHa, modules, records):
        return per_module_peft_export("LoHa", {
            "peft_type": "LOHA", "r": spec.r, "alpha": spec.alpha, "rank_dropout": spec.rank_dropout,
            "module_dropout": spec.module_dropout, "init_weights": True, "use_effective_conv2d": False,
            "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern)}, modules, records)

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["LoHa", "LoHaMethod", "LoHaModule"]
