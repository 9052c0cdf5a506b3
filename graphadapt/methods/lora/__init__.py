"""LoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), init (:mod:`.init`),
PEFT interop (:mod:`.peft`), AdapterHub interop (:mod:`.adapterhub`, shared with IA3), and the registry entry below.

before: ``y = linear(x, W, b)``  →  after: ``y' = LoRAModule(x, y, W, b) = y + s·B·A·dropout(x)``
(DoRA / gated variants: see :mod:`.module`). Mergeable through ``LoRAModule.fold``.
"""

from __future__ import annotations

import torch

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from . import adapterhub as _ah
from .arithmetic import low_rank_lora, weighted_lora
from .corda import corda_init
from . import averaging as _avg
from .init import LORA_INIT_SCHEMES, init_lora_
from .experts import ExpertLoRAModule
from .module import LoRAGate, LoRAModule
from .peft import peft_key, peft_lora_export, peft_lora_spec, read_target_parameters
from .spec import LORA_INITS, LoRA


@register
class LoRAMethod(LinearSiteMethod):
    name = "lora"
    spec_class = LoRA
    peft_type = "LORA"
    adapterhub_architectures = ("lora",)
    average_strategies = _avg.STRATEGIES  # AdapterHub's LoRA-only average_adapter strategies (graphadapt.averaging)

    def build(self, spec: LoRA, adapter, site, seed, weight=None):
        if getattr(site, "num_experts", None):
            return self._build_experts(spec, adapter, site, seed, weight)
        if spec.lora_bias and site.bias is None:
            raise SpecError(f"adapter {adapter!r}: lora_bias=True needs a layer with a bias, but {site.name} has none "
                            "(PEFT refuses it too); target layers with a bias or drop lora_bias", field="lora_bias")
        r, alpha = spec.rank_alpha(site.name, site.module_path)
        mod = LoRAModule(
            site.in_features, site.out_features, r=r, alpha=alpha, dropout=spec.dropout,
            use_rslora=spec.use_rslora, use_dora=spec.use_dora, use_gating=spec.use_gating, lora_bias=spec.lora_bias,
            dora_form=spec.dora_form,
            fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
            total_out=site.total_out, out_rows=getattr(site, "out_rows", None), dtype=weight.dtype,
            device=weight.device)
        with torch.no_grad():
            new_w = init_lora_(mod, spec.init, adapter_generator(seed, adapter, site.name),
                               base_weight=weight.detach())
        return mod, new_w  # PiSSA moves the principal part of W into the adapter

    def _build_experts(self, spec: LoRA, adapter, site, seed, weight):
        """Per-expert LoRA on a fused 3-d expert weight (PEFT's ``target_parameters``)."""
        for flag, what in (("use_dora", "DoRA"), ("use_gating", "gated LoRA"), ("lora_bias", "lora_bias")):
            if getattr(spec, flag):
                raise SpecError(f"adapter {adapter!r}: {what} is not available on the expert weights of {site.name}; "
                                "target attention/dense roles with it, or drop the expert roles", field=flag)
        r, alpha = spec.rank_alpha(site.name, getattr(site, "module_path", None))
        mod = ExpertLoRAModule(site.num_experts, site.in_features, site.out_features, r=r, alpha=alpha,
                               dropout=spec.dropout, use_rslora=spec.use_rslora, transposed=site.layout == "conv1d",
                               out_slice=site.out_slice, total_out=site.total_out, dtype=weight.dtype,
                               device=weight.device)
        mod.init_(spec.init, adapter_generator(seed, adapter, site.name))
        return mod

    represents_weight_deltas = True

    def weighted_adapter(self, sources, weights, sites, options):
        return weighted_lora(sources, weights, sites, options)

    def from_weight_deltas(self, deltas, rank, sites, options):
        return low_rank_lora(deltas, rank, sites, options)

    def peft_spec(self, config, targets):
        return peft_lora_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)

    def peft_export(self, spec, modules, records):
        return peft_lora_export(spec, modules, records)

    def peft_read(self, model, config, weights, name, directory):
        if config.get("target_parameters"):   # LoRA on 3-d expert weights
            return read_target_parameters(model, config, weights, name)
        return None

    def adapterhub_spec(self, config):
        return _ah.lora_spec_from_config(config)

    def average_spec(self, spec, strategy, svd_rank):
        return _avg.average_spec(spec, strategy, svd_rank)

    def average_modules(self, new, sources, strategy, svd_rank):
        _avg.average_modules(new, sources, strategy, svd_rank)

    def adapterhub_checkpoint_spec(self, spec, state_dict, saved_name):
        return _ah.checkpoint_spec(spec, state_dict, saved_name)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _ah.load_weights(adapted, adapter, saved_name, state_dict, strict, directory)


__all__ = ["corda_init", "ExpertLoRAModule", "LORA_INITS", "LORA_INIT_SCHEMES", "LoRA", "LoRAGate", "LoRAMethod", "LoRAModule", "init_lora_"]
