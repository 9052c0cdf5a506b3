"""Toy method spec: a learned per-channel scale on linear outputs, ``y → (1 + s) ⊙ y``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import MethodSpec, check_layer_indices, check_real, register_method, spec_field
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class ChannelScale(LinearTargets, MethodSpec):
    """``y → (1 + s) ⊙ y`` per output channel; ``s`` starts at ``init`` (0: identity)."""

    method: ClassVar[str] = "channel_scale"

    targets: tuple[str, ...] = spec_field(("o",), help="Where: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices; None: every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices never adapted.")
    init: float = spec_field(0.0, help="Initial value of s (0: identity).")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "targets", normalise_targets(self.targets))
        object.__setattr__(self, "layers", check_layer_indices("layers", self.layers, allow_none=True))
        object.__setattr__(self, "leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        object.__setattr__(self, "init", check_real("init", self.init, -1.0, None, low_open=True))
