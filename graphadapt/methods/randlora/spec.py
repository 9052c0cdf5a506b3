"""RandLoRA spec (Albert et al., 2025): a full-rank update from ``ceil(min(in, out)/r)`` frozen random rank-``r`` bases
shared by every site of the adapter, each scaled by trainable diagonal factors ``λ`` [r, bases] and ``γ`` [bases, min]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class RandLoRA(LinearTargets, MethodSpec):
    """Full-rank adaptation from shared random bases (PEFT's ``RandLoraConfig``)."""

    method: ClassVar[str] = "randlora"

    r: int = spec_field(32, help="Rank of each random basis (int > 0); fewer, larger bases as r grows.")
    alpha: float = spec_field(640.0, help="Scaling numerator (PEFT's randlora_alpha): the update is scaled by alpha/r.")
    dropout: float = spec_field(0.0, help="Dropout on the RandLoRA branch input, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert RandLoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: λ = 0, γ = 1/min(in, out) (identity, PEFT's default); False: "
                                               "λ ~ N(0, 1), γ = 1/max(in, out).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("alpha", check_real("alpha", self.alpha))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


__all__ = ["RandLoRA"]
