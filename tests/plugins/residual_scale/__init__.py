"""A toy residual-site method plugin living outside the package: one folder, one registry entry.

tests/test_plugins.py drives apply, merge (refused, reported), save/load, composition and ONNX export through it.
"""

from __future__ import annotations

from graphadapt.methods import ResidualSiteMethod, register

from .module import ResidualScaleModule
from .spec import ResidualScale


@register
class ResidualScaleMethod(ResidualSiteMethod):
    name = "residual_scale"
    spec_class = ResidualScale

    def positions(self, spec):
        return (spec.position,)

    def build(self, spec, adapter, target, seed, hidden=None, norm=None, ref=None):
        return ResidualScaleModule(hidden, spec.init, norm, dtype=ref.dtype, device=ref.device)


__all__ = ["ResidualScale", "ResidualScaleMethod", "ResidualScaleModule"]
