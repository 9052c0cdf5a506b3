"""HRA spec (Yuan et al., 2024, "Bridging the gap between low-rank and orthogonal adaptation via Householder
reflection adaptation"; PEFT ``HRAConfig``).

    y = x Wᵀ + b  →  y = (x Hᵀ) Wᵀ + b      (the layer input is reflected first), H = H_1 ⋯ H_r,
    H_i = I - 2 u_i u_iᵀ / ‖u_i‖² (or, with apply_GS, H = I - 2 Q Qᵀ for Q an orthonormal basis of u_1 … u_r).

Mergeable: ``W' = W H``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import MethodSpec, check_bool, check_int, check_layer_indices, register_method, spec_field
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class HRA(LinearTargets, MethodSpec):
    """Householder reflection adaptation (PEFT semantics)."""

    method: ClassVar[str] = "hra"

    r: int = spec_field(8, help="Number of Householder reflections per layer (int > 0; even for the symmetric init).")
    apply_GS: bool = spec_field(False, help="Orthonormalise the reflection vectors (Gram–Schmidt) first.")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert HRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: PEFT's symmetric init (columns in equal pairs, so H = I; "
                                    "kaiming-uniform halves); False: kaiming-uniform columns (H ≠ I).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("apply_GS", check_bool("apply_GS", self.apply_GS))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))


__all__ = ["HRA"]
