"""FourierFT as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW = scaling·Re(IDFT2(sparse spectrum))``.
Mergeable (``W + ΔW``). Init: coefficients ~ N(0, 1) (PEFT's default) or zeros (``init_weights=True``), drawn from
``adapter_generator(seed, adapter, site)`` only; locations from ``random_loc_seed`` as PEFT.
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import FourierFTModule, frequency_locations
from .spec import FourierFT

_KEY = peft_key_pattern(("fourierft_spectrum",))


@register
class FourierFTMethod(LinearSiteMethod):
    name = "fourierft"
    spec_class = FourierFT
    peft_type = "FOURIERFT"

    def build(self, spec: FourierFT, adapter, site, seed, weight=None):
        refuse_expert_site("FourierFT", adapter, site)
        n = spec.frequencies_at(site.name, getattr(site, "module_path", None))
        mod = FourierFTModule(site, n_frequency=n, scaling=spec.scaling,
                              random_loc_seed=spec.random_loc_seed, dtype=weight.dtype, device=weight.device)
        if not spec.init_weights:
            with torch.no_grad():
                normal_(mod.fourierft_spectrum, 1.0, adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "FourierFT")
        return FourierFT(n_frequency=config_number(config, "n_frequency", int),
                         n_frequency_pattern=dict(config.get("n_frequency_pattern") or {}),
                         scaling=config_number(config, "scaling", default=150.0),
                         random_loc_seed=config_number(config, "random_loc_seed", int, default=777), targets=targets)

    def peft_export(self, spec: FourierFT, modules, records):
        return per_module_peft_export("FourierFT", {
            "peft_type": "FOURIERFT", "n_frequency": spec.n_frequency, "scaling": spec.scaling,
            "random_loc_seed": spec.random_loc_seed, "fan_in_fan_out": False, "init_weights": False,
            "n_frequency_pattern": dict(spec.n_frequency_pattern), "bias": "none"}, modules, records)

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["FourierFT", "FourierFTMethod", "FourierFTModule", "frequency_locations"]
