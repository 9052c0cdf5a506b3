"""MiSS (formerly Bone) as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import
(:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = MiSSModule(x, y, W, b) = y + x ΔWᵀ`` with ``ΔW`` one shared
shard tiled over the input blocks (or block-affine in ``W``: ``bat``). Mergeable (``W' = W + ΔW``).

Init (PEFT's): zeros (identity), or kaiming-uniform(a=√5) with ``init_weights=False``, drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import math

import torch

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator, kaiming_uniform_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import MiSSModule
from .peft import peft_key, peft_miss_spec
from .spec import MiSS


@register
class MiSSMethod(LinearSiteMethod):
    name = "miss"
    spec_class = MiSS
    peft_type = "MISS"

    def build(self, spec: MiSS, adapter, site, seed, weight=None):
        check_plain_site("MiSS", adapter, site)
        n_in, n_out, where = site.in_features, site.out_features, f"adapter {adapter!r} at {site.name}"
        if spec.r > n_in:
            raise SpecError(f"{where}: r={spec.r} exceeds in_features={n_in}", field="r")
        if spec.mode == "bat" and (n_in % spec.r or n_out % spec.r):
            raise SpecError(f"{where}: init_weights='bat' needs in_features={n_in} and out_features={n_out} "
                            f"divisible by r={spec.r}", field="r")
        if spec.mode == "mini" and n_out % spec.mini_r:
            raise SpecError(f"{where}: out_features={n_out} is not divisible by mini_r={spec.mini_r}", field="mini_r")
        mod = MiSSModule(n_in, n_out, r=spec.r, mode=spec.mode, mini_r=spec.mini_r, dropout=spec.dropout,
                         fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice, total_out=site.total_out,
                         out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)
        if spec.init_weights is False:
            with torch.no_grad():
                kaiming_uniform_(mod.miss_block, math.sqrt(5), adapter_generator(seed, adapter, site.name))
        return mod

    def peft_spec(self, config, targets):
        return peft_miss_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["MiSS", "MiSSMethod", "MiSSModule"]
