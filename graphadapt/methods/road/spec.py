"""RoAd spec (Liao et al., 2024, "2D rotary adaptation"; PEFT ``RoadConfig``).

    y = W x + b  →  y' = R y,   R = per-pair 2-d rotations with scales: within each group of ``group_size``
    outputs, element i of the first half and element i of the second half are rotated by θ and scaled by α.

``variant``: ``road_1`` (θ, α shared by the two rows of a pair), ``road_2`` (per output), ``road_4`` (separate
angles/scales for the cos and sin terms). Mergeable: ``W' = R W``, ``b' = R b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_bool, check_choice, check_int, check_layer_indices,
                                  register_method, spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


@register_method
@dataclass(frozen=True)
class RoAd(LinearTargets, MethodSpec):
    """2-D rotary adaptation of linear outputs (PEFT semantics)."""

    method: ClassVar[str] = "road"

    variant: str = spec_field("road_1", help="'road_1', 'road_2' or 'road_4' (parameters: out/2, out, 2·out).")
    group_size: int = spec_field(64, help="Outputs per rotation group (even; divides every targeted layer's width).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert RoAd: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: θ = 0, α = 1 (identity, PEFT's default); False: θ ~ N(0, 0.5²), "
                                    "α ~ N(1, 0.5²).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        check_choice("variant", self.variant, ROAD_VARIANTS)
        set_("group_size", check_int("group_size", self.group_size, minimum=2))
        if self.group_size % 2:
            raise SpecError(f"group_size must be even, got {self.group_size}", field="group_size")
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))


__all__ = ["ROAD_VARIANTS", "RoAd"]
