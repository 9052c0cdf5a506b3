"""VB-LoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + B A dropout(x)``, A and B mixed from a shared trainable vector
bank. Mergeable (``W + B A``). Init: bank U(±init_vector_bank_bound) from ``adapter_generator(seed, adapter,
"vblora_bank")``, logits N(0, init_logits_std²) per site (PEFT's scheme; the output changes at init).
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_, uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import config_number, peft_key_pattern, refuse_expert_site, refuse_peft_options
from graphadapt.methods.registry import register
from graphadapt.passes import submodule_or_none
from graphadapt.vocab import adapter_target

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
        kept = submodule_or_none(gm, adapter_target(adapter, SHARED))
        if kept is not None:   # re-planning (set_active): keep the trained bank
            return {"bank": kept}
        for s in sites:
            refuse_expert_site("VB-LoRA", adapter, s)
        ref = gm.get_parameter(sites[0].weight)
        bank = VBLoRABank(spec.num_vectors, spec.vector_length, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            b = spec.init_vector_bank_bound
            uniform_(bank.vblora_vector_bank, -b, b, adapter_generator(seed, adapter, SHARED))
        gm.add_submodule(adapter_target(adapter, SHARED), bank)
        return {"bank": bank}

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

    def peft_key(self, key):
        m = _KEY.match(key)
        if m is None:
            return None
        return ("", f"{SHARED}.{m['shared']}") if m["shared"] else (m["path"], m["kind"])


__all__ = ["VBLoRA", "VBLoRABank", "VBLoRAMethod", "VBLoRAModule", "mix"]
