"""MTL-LoRA spec (Yang et al., 2024; AdapterHub ``MTLLoRAConfig`` / "mtl_lora"): one task's low-rank update with a
task-specific ``r × r`` transform between the down and the up projections and several up projections mixed by
learned softmax-like weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_bool, check_choice, check_int, check_layer_indices, check_real,
                                  is_real, register_method, spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

MTL_INITS = ("lora", "bert")


@register_method
@dataclass(frozen=True)
class MTLLoRA(LinearTargets, MethodSpec):
    """``y' = y + s · Σ_k ŵ_k · B_k Λ A x`` with ``ŵ = exp(w / sharpness) / Σ exp(w / sharpness)``, ``Λ = diag(λ)``
    (AdapterHub ``task_specific_matrix_type="singular_values"``)."""

    method: ClassVar[str] = "mtl_lora"

    r: int = spec_field(8, help="Rank of A [r, in] and of each up projection B_k [out, r].")
    alpha: float = spec_field(8, help="Scaling alpha / r.")
    dropout: float = spec_field(0.0, help="Dropout on the input of the update, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert it: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    n_up_projection: int = spec_field(1, help="Number of up projections B_k mixed by the learned weights.")
    weights_sharpness: float = spec_field(0.05, help="Temperature of the up-projection mixing weights.")
    init: str = spec_field("lora", help="'lora' (A kaiming-uniform a=√5, B zero: identity at init) or 'bert' (both N(0, 0.02)).")
    use_gating: bool = spec_field(False, help="AdapterHub's gate: mean_seq sigmoid(x Gᵀ + g) replaces alpha / r.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SpecError(f"alpha must be a number > 0, got {self.alpha!r}", field="alpha")
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("n_up_projection", check_int("n_up_projection", self.n_up_projection, minimum=1))
        set_("weights_sharpness", check_real("weights_sharpness", self.weights_sharpness, 0.0, None, low_open=True))
        check_choice("init", self.init, MTL_INITS)
        check_bool("use_gating", self.use_gating)


__all__ = ["MTL_INITS", "MTLLoRA"]
