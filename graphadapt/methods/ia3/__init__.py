"""IA3 as a method plugin (PEFT semantics): spec (:mod:`.spec`), module (:mod:`.module`).

before: ``y = linear(x, W, b)``  →  after: ``y' = IA3Module(x, y, W, b)``: ``l ⊙ y`` (output
scaling) or ``linear(l ⊙ x, W, b)`` for the spec's ``feedforward`` targets. Mergeable.

Init: ``init_ia3_weights=True``: ones (identity); ``False``: N(0, 1) (PEFT's ``torch.randn``),
drawn from ``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import torch

from graphadapt.init import adapter_generator, normal_, ones_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from .module import IA3Module
from .spec import IA3


@register
class IA3Method(LinearSiteMethod):
    name = "ia3"
    spec_class = IA3

    def build(self, spec: IA3, adapter, site, seed, weight=None):
        mod = IA3Module(site.in_features, site.out_features, feedforward=spec.is_feedforward(site),
                        fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice,
                        total_out=site.total_out, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if spec.init_ia3_weights:
                ones_(mod.ia3_l)
            else:
                normal_(mod.ia3_l, 1.0, adapter_generator(seed, adapter, site.name))
        return mod


__all__ = ["IA3", "IA3Method", "IA3Module"]
