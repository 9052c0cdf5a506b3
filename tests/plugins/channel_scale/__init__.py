"""A toy graphadapt method plugin living outside the package: one folder, one registry entry.

tests/test_plugins.py registers it and drives apply, merge, save/load and ONNX export through it.
"""

from __future__ import annotations

from graphadapt.methods import LinearSiteMethod, register

from .module import ChannelScaleModule
from .spec import ChannelScale


@register
class ChannelScaleMethod(LinearSiteMethod):
    name = "channel_scale"
    spec_class = ChannelScale

    def build(self, spec, adapter, site, seed, weight=None):
        # a fused projection's slice (GPT-2 c_attn) comes with out_slice/out_rows + total_out: pass them on
        return ChannelScaleModule(site.in_features, site.out_features, fan_in_fan_out=site.layout == "conv1d",
                                  init=spec.init, out_slice=site.out_slice, total_out=site.total_out,
                                  out_rows=getattr(site, "out_rows", None), dtype=weight.dtype, device=weight.device)


__all__ = ["ChannelScale", "ChannelScaleMethod", "ChannelScaleModule"]
