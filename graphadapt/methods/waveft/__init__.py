"""WaveFT as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW = scaling·IDWT2(sparse coefficients)`` (Haar).
Mergeable. Init: zeros (PEFT's default) or N(0, 0.01²) (``init_weights=False``) from
``adapter_generator(seed, adapter, site)``; locations from ``random_loc_seed`` as PEFT.
"""

from __future__ import annotations

import torch

from graphadapt.errors import CheckpointError
from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import WaveFTModule, haar_synthesis
from .spec import WAVELETS, WaveFT

_KEY = peft_key_pattern(("waveft_spectrum",))


@register
class WaveFTMethod(LinearSiteMethod):
    name = "waveft"
    spec_class = WaveFT
    peft_type = "WAVEFT"

    def build(self, spec: WaveFT, adapter, site, seed, weight=None):
        refuse_expert_site("WaveFT", adapter, site)
        n = spec.frequencies_at(site.name, getattr(site, "module_path", None))
        mod = WaveFTModule(site, n_frequency=n, scaling=spec.scaling,
                           random_loc_seed=spec.random_loc_seed, use_idwt=spec.use_idwt, dtype=weight.dtype,
                           device=weight.device)
        if not spec.init_weights:
            with torch.no_grad():
                normal_(mod.waveft_spectrum, 0.01, adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, ("proportional_parameters",), "WaveFT")
        family = config.get("wavelet_family", "db1")
        if config.get("use_idwt", True) and family not in WAVELETS:
            raise CheckpointError(f"PEFT WaveFT with wavelet_family={family!r}: the importer implements "
                                  f"{list(WAVELETS)} only")
        return WaveFT(n_frequency=config_number(config, "n_frequency", int),
                      n_frequency_pattern=dict(config.get("n_frequency_pattern") or {}),
                      scaling=config_number(config, "scaling", default=25.0),
                      wavelet_family=family if family in WAVELETS else "db1",
                      use_idwt=bool(config.get("use_idwt", True)),
                      random_loc_seed=config_number(config, "random_loc_seed", int, default=777), targets=targets)

    def peft_export(self, spec: WaveFT, modules, records):
        return per_module_peft_export("WaveFT", {
            "peft_type": "WAVEFT", "n_frequency": spec.n_frequency, "scaling": spec.scaling,
            "wavelet_family": spec.wavelet_family, "use_idwt": spec.use_idwt, "random_loc_seed": spec.random_loc_seed,
            "fan_in_fan_out": False, "init_weights": True, "proportional_parameters": False,
            "n_frequency_pattern": dict(spec.n_frequency_pattern), "bias": "none"}, modules, records)

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["WaveFT", "WaveFTMethod", "WaveFTModule", "haar_synthesis"]
