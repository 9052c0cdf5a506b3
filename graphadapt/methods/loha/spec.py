"""LoHa spec (Hyeon-Woo et al., 2022, FedPara; LyCORIS): ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)``, ``s = alpha / r``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.methods.patterns import check_pattern, pick
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class LoHa(LinearTargets, MethodSpec):
    """Low-rank Hadamard product adaptation (PEFT's ``LoHaConfig`` on linear layers)."""

    method: ClassVar[str] = "loha"

    r: int = spec_field(8, help="Rank of each of the two factor products (int > 0); the update has rank <= r².")
    alpha: float = spec_field(8.0, help="Scaling numerator: the update is scaled by alpha / r.")
    rank_dropout: float = spec_field(0.0, help="Training only: drop each output row of ΔW with this probability "
                                                "(kept rows rescaled by 1/mean), in [0, 1).")
    module_dropout: float = spec_field(0.0, help="Training only: skip the whole update with this probability, "
                                                  "in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert LoHa: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: W2b starts at zero (identity, PEFT's default); False: every "
                                               "factor Kaiming-uniform (the output changes at init).")
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
        set_("module_dropout", check_real("module_dropout", self.module_dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("rank_pattern", check_pattern("rank_pattern", self.rank_pattern, integer=True))
        set_("alpha_pattern", check_pattern("alpha_pattern", self.alpha_pattern, integer=False))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def rank_alpha(self, *names: str) -> tuple[int, float]:
        """``(r, alpha)`` at a site known by ``names`` (site name, module path): the patterns, else ``r``/``alpha``."""
        return pick(self.rank_pattern, names, self.r), pick(self.alpha_pattern, names, self.alpha)


__all__ = ["LoHa"]
