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
        if site.out_slice is not None:
            raise NotImplementedError("the toy method does not handle fused slices")
        return ChannelScaleModule(site.out_features, site.layout == "conv1d", spec.init,
                                  dtype=weight.dtype, device=weight.device)


__all__ = ["ChannelScale", "ChannelScaleMethod", "ChannelScaleModule"]
