"""GraLoRA spec (Jung et al., 2025): the weight is cut into ``k × k`` blocks, each with its own rank-``r/k`` LoRA whose
factors are shared along block rows/columns (``A`` per input block, ``B`` per output block); an optional plain LoRA of
rank ``hybrid_r`` is added. Scaling ``alpha / (r + hybrid_r)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class GraLoRA(LinearTargets, MethodSpec):
    """Granular low-rank adaptation (PEFT's ``GraloraConfig``)."""

    method: ClassVar[str] = "gralora"

    r: int = spec_field(32, help="Total rank (int > 0, divisible by k): each block's LoRA has rank r/k.")
    alpha: float = spec_field(64.0, help="Scaling numerator: the update is scaled by alpha / (r + hybrid_r).")
    k: int = spec_field(2, help="Blocks per dimension (PEFT's gralora_k); must divide every adapted in and out.")
    hybrid_r: int = spec_field(0, help="Rank of an extra plain LoRA over the whole weight (0: none).")
    dropout: float = spec_field(0.0, help="Dropout on the GraLoRA branch input, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert GraLoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: A Kaiming-uniform, B zero (identity, PEFT's default); False: "
                                               "both Kaiming-uniform.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("k", check_int("k", self.k, minimum=1))
        if self.r % self.k:
            raise SpecError(f"r={self.r} must be divisible by k={self.k}", field="r")
        set_("alpha", check_real("alpha", self.alpha))
        set_("hybrid_r", check_int("hybrid_r", self.hybrid_r, minimum=0))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


__all__ = ["GraLoRA"]
