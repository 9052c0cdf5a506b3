"""LoKr spec (Edalati et al., 2022; LyCORIS): ``ΔW = s · W1 ⊗ W2`` (Kronecker product), ``s = alpha / r``; each factor
is full or a rank-``r`` product, as PEFT decides from ``r`` and the factorised sizes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.methods.patterns import check_pattern, pick
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class LoKr(LinearTargets, MethodSpec):
    """Low-rank Kronecker product adaptation (PEFT's ``LoKrConfig`` on linear layers)."""

    method: ClassVar[str] = "lokr"

    r: int = spec_field(8, help="Rank of the factors that are decomposed (int > 0); a factor stays full when r >= "
                                "half its larger side (PEFT's rule).")
    alpha: float = spec_field(8.0, help="Scaling numerator: the update is scaled by alpha / r.")
    rank_dropout: float = spec_field(0.0, help="Training only: drop each output row of ΔW with this probability, "
                                                "in [0, 1).")
    rank_dropout_scale: bool = spec_field(False, help="Rescale kept rows by 1/mean under rank_dropout.")
    module_dropout: float = spec_field(0.0, help="Training only: skip the whole update with this probability.")
    decompose_both: bool = spec_field(False, help="Also decompose the left factor W1 into a rank-r product.")
    decompose_factor: int = spec_field(-1, help="Kronecker factorisation of each dimension: -1 near its square root, "
                                                "else this divisor (PEFT's decompose_factor).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert LoKr: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool | str = spec_field(True, help="True: W1 (or W1a) zero, the rest Kaiming-uniform (identity, "
                                                     "PEFT's default); 'lycoris': W2 (or W2b) zero instead; False: "
                                                     "every factor Kaiming-uniform.")
    rank_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's rank_pattern: {regex: r} overriding r at the sites whose module path the regex "
        "matches at its end ('(.*\\.)?<regex>' matches it whole, PEFT's rule); the first matching key wins.")
    alpha_pattern: Mapping[str, float] = spec_field(
        FrozenMapping(), help="PEFT's alpha_pattern: {regex: alpha} overriding alpha the same way.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("alpha", check_real("alpha", self.alpha, 0.0, None, low_open=True))
        set_("rank_dropout", check_real("rank_dropout", self.rank_dropout, 0.0, 1.0))
        set_("rank_dropout_scale", check_bool("rank_dropout_scale", self.rank_dropout_scale))
        set_("module_dropout", check_real("module_dropout", self.module_dropout, 0.0, 1.0))
        set_("decompose_both", check_bool("decompose_both", self.decompose_both))
        set_("decompose_factor", check_int("decompose_factor", self.decompose_factor, minimum=-1))
        if self.decompose_factor == 0:
            raise SpecError("decompose_factor must be -1 (near the square root) or a divisor > 0, got 0",
                            field="decompose_factor")
        if self.init_weights not in (True, False, "lycoris"):
            raise SpecError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}",
                            field="init_weights")
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("rank_pattern", check_pattern("rank_pattern", self.rank_pattern, integer=True))
        set_("alpha_pattern", check_pattern("alpha_pattern", self.alpha_pattern, integer=False))

    def rank_alpha(self, *names: str) -> tuple[int, float]:
        """``(r, alpha)`` at a site known by ``names`` (site name, module path): the patterns, else ``r``/``alpha``."""
        return pick(self.rank_pattern, names, self.r), pick(self.alpha_pattern, names, self.alpha)


__all__ = ["LoKr"]
