"""VB-LoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + B A dropout(x)``, A and B mixed from a shared trainable vector
bank. Mergeable (``W + B A``). Init: bank U(±init_vector_bank_bound) from ``adapter_generator(seed, adapter,
"vblora_bank")``, logits N(0, init_logits_std²) per site (PEFT's scheme; the output changes at init).
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_, uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, prepare_shared,
                                      refuse_expert_site, refuse_peft_options)
from graphadapt.methods.registry import register

from .module import VBLoRABank, VBLoRAModule, mix
from .spec import VBLoRA

SHARED = "vblora_bank"
_KEY = peft_key_pattern(("vblora_logits_A", "vblora_logits_B"), shared=("vblora_vector_bank",))


@register
class VBLoRAMethod(LinearSiteMethod):
    name = "vblora"
    spec_class = VBLoRA
    peft_type = "VBLORA"

    def prepare(self, gm, adapter, spec: VBLoRA, sites, seed):
        def make(ref):
            bank = VBLoRABank(spec.num_vectors, spec.vector_length, dtype=ref.dtype, device=ref.device)
            with torch.no_grad():
                b = spec.init_vector_bank_bound
                uniform_(bank.vblora_vector_bank, -b, b, adapter_generator(seed, adapter, SHARED))
            return bank

        return {"bank": prepare_shared(gm, adapter, SHARED, sites, "VB-LoRA", make)}

    def build(self, spec: VBLoRA, adapter, site, seed, weight=None, bank=None):
        refuse_expert_site("VB-LoRA", adapter, site)
        mod = VBLoRAModule(site, bank, r=spec.r, topk=spec.topk, dropout=spec.dropout, dtype=weight.dtype,
                           device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            normal_(mod.vblora_logits_A, spec.init_logits_std, g)
            normal_(mod.vblora_logits_B, spec.init_logits_std, g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, ("save_only_topk_weights",), "VB-LoRA")
        return VBLoRA(r=config_number(config, "r", int), num_vectors=config_number(config, "num_vectors", int),
                      vector_length=config_number(config, "vector_length", int),
                      topk=config_number(config, "topk", int, default=2),
                      dropout=config_number(config, "vblora_dropout", default=0.0), targets=targets)

    def peft_export(self, spec: VBLoRA, modules, records):
        """Logits per site and the shared bank (full logits: ``save_only_topk_weights=False``)."""
        fields, tensors = per_module_peft_export("VB-LoRA", {
            "peft_type": "VBLORA", "r": spec.r, "num_vectors": spec.num_vectors, "vector_length": spec.vector_length,
            "topk": spec.topk, "vblora_dropout": spec.dropout, "save_only_topk_weights": False,
            "init_vector_bank_bound": spec.init_vector_bank_bound, "init_logits_std": spec.init_logits_std,
            "fan_in_fan_out": False, "bias": "none"}, modules, records)
        bank = next(iter(modules.values()))._shared.module
        return fields, {**tensors, "base_model.vblora_vector_bank": bank.vblora_vector_bank}

    def peft_key(self, key):
        m = _KEY.match(key)
        if m is None:
            return None
        return ("", f"{SHARED}.{m['shared']}") if m["shared"] else (m["path"], m["kind"])


__all__ = ["VBLoRA", "VBLoRABank", "VBLoRAMethod", "VBLoRAModule", "mix"]
