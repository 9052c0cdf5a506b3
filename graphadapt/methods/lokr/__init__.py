"""LoKr as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW = (alpha/r)·W1 ⊗ W2``. Mergeable (``W + ΔW``).
Init (PEFT's): W1 (or W1a) zero and the others Kaiming-uniform(a=√5); ``'lycoris'``: W2 (or W2b) zero instead;
``False``: all Kaiming-uniform — drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options)
from graphadapt.methods.registry import register

from .module import LoKrModule, factorization
from .spec import LoKr

_KEY = peft_key_pattern(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))


@register
class LoKrMethod(LinearSiteMethod):
    name = "lokr"
    spec_class = LoKr
    peft_type = "LOKR"

    def build(self, spec: LoKr, adapter, site, seed, weight=None):
        refuse_expert_site("LoKr", adapter, site)
        r, alpha = spec.rank_alpha(site.name, getattr(site, "module_path", None))
        mod = LoKrModule(site, r=r, alpha=alpha, decompose_both=spec.decompose_both,
                         decompose_factor=spec.decompose_factor, rank_dropout=spec.rank_dropout,
                         rank_dropout_scale=spec.rank_dropout_scale, module_dropout=spec.module_dropout,
                         dtype=weight.dtype, device=weight.device)
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[spec.init_weights]
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
                p = getattr(mod, name)
                if p is not None and name not in zero:
                    kaiming_uniform_(p, math.sqrt(5), g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "LoKr")
        return LoKr(r=config_number(config, "r", int), alpha=config_number(config, "alpha"),
                    rank_pattern=dict(config.get("rank_pattern") or {}),
                    alpha_pattern=dict(config.get("alpha_pattern") or {}),
                    rank_dropout=config_number(config, "rank_dropout", default=0.0),
                    rank_dropout_scale=bool(config.get("rank_dropout_scale", False)),
                    module_dropout=config_number(config, "module_dropout", default=0.0),
                    decompose_both=bool(config.get("decompose_both", False)),
                    decompose_factor=config_number(config, "decompose_factor", int, default=-1), targets=targets)

    def peft_export(self, spec: LoKr, modules, records):
        return per_module_peft_export("LoKr", {
            "peft_type": "LOKR", "r": spec.r, "alpha": spec.alpha, "rank_dropout": spec.rank_dropout,
            "rank_dropout_scale": spec.rank_dropout_scale, "module_dropout": spec.module_dropout,
            "decompose_both": spec.decompose_both, "decompose_factor": spec.decompose_factor, "init_weights": True,
            "use_effective_conv2d": False, "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern)}, modules, records)

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])


__all__ = ["LoKr", "LoKrMethod", "LoKrModule", "factorization"]
