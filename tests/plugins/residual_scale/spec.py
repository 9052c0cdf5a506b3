"""Toy residual-site method spec: a learned per-channel gain on a sub-block's output before its residual add."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import MethodSpec, check_choice, check_layer_indices, check_real, register_method, spec_field

POSITIONS = ("mh", "output")


@register_method
@dataclass(frozen=True)
class ResidualScale(MethodSpec):
    """``out = norm(r + (1 + g) ⊙ h)`` at the chosen residual points; ``g`` starts at ``init`` (0: identity)."""

    method: ClassVar[str] = "residual_scale"

    position: str = spec_field("output", help="Which residual point: 'mh' (after attention) or 'output' (after the FFN).")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices; None: every layer.")
    init: float = spec_field(0.0, help="Initial value of g (0: identity).")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "position", check_choice("position", self.position, POSITIONS))
        object.__setattr__(self, "layers", check_layer_indices("layers", self.layers, allow_none=True))
        object.__setattr__(self, "init", check_real("init", self.init, None, None))
