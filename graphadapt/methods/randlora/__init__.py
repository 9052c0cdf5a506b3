"""RandLoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + s·x ΔWᵀ``, ``ΔW`` a sum of frozen random bases scaled by
trainable λ, γ. Mergeable. Init: the shared bases Kaiming-uniform(a=√5) then divided by their std (PEFT's dense
scheme; A first, then B one basis at a time) from ``adapter_generator(seed, adapter, "randlora_bases")``; λ = 0,
γ = 1/min(in, out) (``init_weights=False``: λ ~ N(0, 1) per site, γ = 1/max(in, out)).
"""

from __future__ import annotations

import math

import torch

from graphadapt.errors import CheckpointError
from graphadapt.init import adapter_generator, kaiming_uniform_, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, prepare_shared,
                                      refuse_expert_site, refuse_peft_options)
from graphadapt.methods.registry import register

from .module import RandLoRABases, RandLoRAModule, num_bases
from .spec import RandLoRA

SHARED = "randlora_bases"
_KEY = peft_key_pattern(("randlora_lambda", "randlora_gamma"), shared=("randlora_A", "randlora_B"))


@register
class RandLoRAMethod(LinearSiteMethod):
    name = "randlora"
    spec_class = RandLoRA
    peft_type = "RANDLORA"

    def prepare(self, gm, adapter, spec: RandLoRA, sites, seed):
        def make(ref):
            bases = RandLoRABases(spec.r, max(s.in_features for s in sites), max(s.out_features for s in sites),
                                  dtype=ref.dtype, device=ref.device)
            g = adapter_generator(seed, adapter, SHARED)
            with torch.no_grad():
                a = torch.empty(bases.randlora_A.shape)
                kaiming_uniform_(a, math.sqrt(5), g)
                parts = []
                for _ in range(bases.randlora_B.shape[1]):
                    part = torch.empty(bases.randlora_B.shape[0], 1, spec.r)
                    kaiming_uniform_(part, math.sqrt(5), g)
                    parts.append(part)
                b = torch.cat(parts, dim=1)
                bases.randlora_A.copy_(a / a.std())
                bases.randlora_B.copy_(b / b.std())
            return bases

        return {"bases": prepare_shared(gm, adapter, SHARED, sites, "RandLoRA", make)}

    def build(self, spec: RandLoRA, adapter, site, seed, weight=None, bases=None):
        refuse_expert_site("RandLoRA", adapter, site)
        mod = RandLoRAModule(site, bases, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, dtype=weight.dtype,
                             device=weight.device)
        with torch.no_grad():
            if spec.init_weights:
                mod.randlora_gamma.fill_(1.0 / max(mod.randlora_gamma.shape))
            else:
                normal_(mod.randlora_lambda, 1.0, adapter_generator(seed, adapter, site.name))
                mod.randlora_gamma.fill_(1.0 / max(mod.in_features, mod.out_features))
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "RandLoRA")
        if config.get("save_projection") is False:
            raise CheckpointError("this PEFT RandLoRA checkpoint was saved with save_projection=False (no randlora_A/"
                                  "randlora_B); the importer needs the bases in the file: save with "
                                  "save_projection=True")
        # sparse / very_sparse only change how PEFT draws the bases, which the checkpoint holds
        return RandLoRA(r=config_number(config, "r", int), alpha=config_number(config, "randlora_alpha"),
                        dropout=config_number(config, "randlora_dropout", default=0.0), targets=targets)

    def peft_export(self, spec: RandLoRA, modules, records):
        """λ, γ per site and the shared bases (``save_projection=True``; the bases are written as drawn)."""
        fields, tensors = per_module_peft_export("RandLoRA", {
            "peft_type": "RANDLORA", "r": spec.r, "randlora_alpha": spec.alpha, "randlora_dropout": spec.dropout,
            "projection_prng_key": 0, "save_projection": True, "sparse": False, "very_sparse": False,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True}, modules, records)
        bases = next(iter(modules.values()))._shared.module
        return fields, {**tensors, "base_model.randlora_A": bases.randlora_A, "base_model.randlora_B": bases.randlora_B}

    def peft_key(self, key):
        m = _KEY.match(key)
        if m is None:
            return None
        return ("", f"{SHARED}.{m['shared']}") if m["shared"] else (m["path"], m["kind"])


__all__ = ["RandLoRA", "RandLoRAMethod", "RandLoRAModule", "RandLoRABases", "num_bases"]
