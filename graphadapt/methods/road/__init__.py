"""RoAd as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import (:mod:`.peft`).

before: ``y = linear(x, W, b)``  →  after: ``y' = RoAdModule(x, y, W, b) = R y`` (2-d rotations with scales of
output pairs). Mergeable (``W' = R W``, ``b' = R b``).

Init (PEFT's): θ = 0, α = 1; ``init_weights=False``: θ ~ N(0, 0.5²), α ~ N(1, 0.5²), drawn from
``adapter_generator(seed, adapter, site)`` only.
"""

from __future__ import annotations

import torch

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from ..transforms import check_plain_site
from .module import RoAdModule
from .peft import peft_key, peft_road_spec
from .spec import ROAD_VARIANTS, RoAd


@register
class RoAdMethod(LinearSiteMethod):
    name = "road"
    spec_class = RoAd
    peft_type = "ROAD"

    def build(self, spec: RoAd, adapter, site, seed, weight=None):
        check_plain_site("RoAd", adapter, site)
        if site.out_features % spec.group_size:
            raise SpecError(f"adapter {adapter!r} at {site.name}: out_features={site.out_features} is not divisible "
                            f"by group_size={spec.group_size}", field="group_size")
        mod = RoAdModule(site.in_features, site.out_features, variant=spec.variant, group_size=spec.group_size,
                         fan_in_fan_out=site.layout == "conv1d", out_slice=site.out_slice, total_out=site.total_out,
                         out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)
        if not spec.init_weights:
            g = adapter_generator(seed, adapter, site.name)
            with torch.no_grad():
                normal_(mod.road_theta, 0.5, g)
                normal_(mod.road_alpha, 0.5, g, mean=1.0)
        return mod

    def peft_spec(self, config, targets):
        return peft_road_spec(config, targets)

    def peft_key(self, key):
        return peft_key(key)


__all__ = ["ROAD_VARIANTS", "RoAd", "RoAdMethod", "RoAdModule"]
