"""IA3 as a method plugin (PEFT semantics): spec (:mod:`.spec`), module (:mod:`.module`).

before: ``y = linear(x, W, b)``  →  after: ``y' = IA3Module(x, y, W, b)``: ``l ⊙ y`` (output
scaling) or ``linear(l ⊙ x, W, b)`` for the spec's ``feedforward`` targets. Mergeable.

Init: ``init_ia3_weights=True``: ones (identity); ``False``: N(0, 1) (PEFT's ``torch.randn``),
drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator, init_bert_, normal_, ones_, uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from . import adapterhub as _ah
from .arithmetic import weighted_ia3
from .experts import ExpertIA3Module
from .module import IA3Module
from .peft import peft_ia3_export, peft_ia3_spec, peft_key
from .spec import IA3


@register
class IA3Method(LinearSiteMethod):
    name = "ia3"
    spec_class = IA3
    peft_type = "IA3"
    adapterhub_architectures = ("lora",)  # AdapterHub's IA3 is a LoRAConfig with composition_mode="scale"

    def build(self, spec: IA3, adapter, site, seed, weight=None):
        if getattr(site, "num_experts", None):   # fused expert weights: one vector per expert
            if spec.use_gating or spec.alpha != 1.0:
                raise SpecError(f"adapter {adapter!r}: gated IA3 and alpha are not available on the expert weights "
                                f"of {site.name}", field="use_gating" if spec.use_gating else "alpha")
            mod = ExpertIA3Module(site.num_experts, site.in_features, site.out_features,
                                  feedforward=spec.is_feedforward(site), transposed=site.layout == "conv1d",
                                  out_slice=site.out_slice, total_out=site.total_out, dtype=weight.dtype,
                                  device=weight.device)
            if not spec.init_ia3_weights:
                with torch.no_grad():
                    normal_(mod.ia3_l, 1.0, adapter_generator(seed, adapter, site.name))
            return mod
        mod = IA3Module(site.in_features, site.out_features, feedforward=spec.is_feedforward(site),
                        fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
                        total_out=site.total_out, out_rows=getattr(site, "out_rows", None),
                        alpha=spec.alpha, use_gating=spec.use_gating,
                        dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            if spec.init_ia3_weights:
                ones_(mod.ia3_l)
            else:
                normal_(mod.ia3_l, 1.0, g)
            if mod.gate is not None:  # AdapterHub's gate init: weight N(0, 0.02²), bias nn.Linear's U(±1/sqrt(in))
                init_bert_(mod.gate.weight, g)
                bound = 1.0 / math.sqrt(site.in_features)
                uniform_(mod.gate.bias, -bound, bound, g)
        return mod

    def weighted_adapter(self, sources, weights, sites, options):
        return weighted_ia3(sources, weights, sites, options)

    def peft_spec(self, config, targets):
        return peft_ia3_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)

    def peft_export(self, spec, modules, records):
        return peft_ia3_export(spec, modules, records)

    def adapterhub_spec(self, config):
        return _ah.ia3_spec_from_config(config)

    def adapterhub_checkpoint_spec(self, spec, state_dict, saved_name):
        return _ah.checkpoint_spec(spec, state_dict, saved_name)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _ah.load_weights(adapted, adapter, saved_name, state_dict, strict, directory)


__all__ = ["ExpertIA3Module", "IA3", "IA3Method", "IA3Module"]
