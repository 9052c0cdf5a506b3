"""VeRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + λ_b ⊙ B(λ_d ⊙ A·dropout(x))``; A, B frozen, shared per adapter.
Mergeable (``W + diag(λ_b) B diag(λ_d) A``). Init: A, B Kaiming-uniform (PEFT's ``_kaiming_init``: U(±√(6/fan_in)),
A then B) from ``adapter_generator(seed, adapter, "vera_projections")`` — or, with ``projection_prng_key``, from
PEFT's own generator; λ_b = 0, λ_d = d_initial (``init_weights=False``: λ_b = 1, λ_d ~ N(0, 1) per site).
"""

from __future__ import annotations

import math

import torch

from graphadapt.errors import CheckpointError
from graphadapt.init import adapter_generator, normal_, ones_, uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, prepare_shared,
                                      refuse_expert_site, refuse_peft_options)
from graphadapt.methods.registry import register

from .module import VeRAModule, VeRAProjections
from .spec import VeRA

SHARED = "vera_projections"
_KEY = peft_key_pattern(("vera_lambda_b", "vera_lambda_d"), shared=("vera_A", "vera_B"))


@register
class VeRAMethod(LinearSiteMethod):
    name = "vera"
    spec_class = VeRA
    peft_type = "VERA"

    def prepare(self, gm, adapter, spec: VeRA, sites, seed):
        def make(ref):
            proj = VeRAProjections(spec.r, max(s.in_features for s in sites), max(s.out_features for s in sites),
                                   dtype=ref.dtype, device=ref.device)
            g = (torch.Generator().manual_seed(spec.projection_prng_key) if spec.projection_prng_key is not None
                 else adapter_generator(seed, adapter, SHARED))
            with torch.no_grad():
                for p in (proj.vera_A, proj.vera_B):   # PEFT's _kaiming_init: fan_in = size(1), gain √2
                    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(p.shape[1])
                    uniform_(p, -bound, bound, g)
            return proj

        return {"projections": prepare_shared(gm, adapter, SHARED, sites, "VeRA", make)}

    def build(self, spec: VeRA, adapter, site, seed, weight=None, projections=None):
        refuse_expert_site("VeRA", adapter, site)
        mod = VeRAModule(site, projections, r=spec.r, dropout=spec.dropout, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if spec.init_weights:
                mod.vera_lambda_d.fill_(spec.d_initial)
            else:
                ones_(mod.vera_lambda_b)
                normal_(mod.vera_lambda_d, 1.0, adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "VeRA")
        if config.get("save_projection") is False:
            raise CheckpointError("this PEFT VeRA checkpoint was saved with save_projection=False (no vera_A/vera_B); "
                                  "the importer needs the projections in the file: save it with save_projection=True")
        return VeRA(r=config_number(config, "r", int), dropout=config_number(config, "vera_dropout", default=0.0),
                    d_initial=config_number(config, "d_initial", default=0.1), targets=targets,
                    projection_prng_key=config_number(config, "projection_prng_key", int, default=0))

    def peft_export(self, spec: VeRA, modules, records):
        """λ_b, λ_d per site and the shared projections (``save_projection=True``). The projections are written as
        they are, so the adapter need not have been drawn with PEFT's ``projection_prng_key``."""
        fields, tensors = per_module_peft_export("VeRA", {
            "peft_type": "VERA", "r": spec.r, "vera_dropout": spec.dropout, "d_initial": spec.d_initial,
            "projection_prng_key": spec.projection_prng_key if spec.projection_prng_key is not None else 0,
            "save_projection": True, "fan_in_fan_out": False, "bias": "none", "init_weights": True}, modules, records)
        proj = next(iter(modules.values()))._shared.module
        return fields, {**tensors, "base_model.vera_A": proj.vera_A, "base_model.vera_B": proj.vera_B}

    def peft_key(self, key):
        m = _KEY.match(key)
        if m is None:
            return None
        return ("", f"{SHARED}.{m['shared']}") if m["shared"] else (m["path"], m["kind"])


__all__ = ["VeRA", "VeRAMethod", "VeRAModule", "VeRAProjections"]
