"""DeLoRA spec (Bini et al., 2025, "Decoupling angles and strength in low-rank adaptation"; PEFT
``DeloraConfig``).

    y = W x + b  →  y = W x + b + B diag(λ / (r ‖a_i‖ ‖b_i‖)) A (‖W_:,j‖ ⊙ x)

a LoRA whose rank-one terms are normalised (``a_i`` rows of A, ``b_i`` columns of B) and whose strength is one
learned ``λ``; the input is scaled by the base weight's column norms (fixed when the adapter is built). Mergeable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.methods.patterns import check_pattern, pick
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class DeLoRA(LinearTargets, MethodSpec):
    """Decoupled low-rank adaptation (PEFT semantics)."""

    method: ClassVar[str] = "delora"

    r: int = spec_field(8, help="Rank of the update (int > 0).")
    delora_lambda: float = spec_field(15.0, help="Initial strength λ (learned; bounds the update's norm).")
    dropout: float = spec_field(0.0, help="Dropout on the branch input (PEFT's module_dropout), in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert DeLoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: kaiming-uniform A, zero B (no change at init, PEFT's default); "
                                    "False: kaiming-uniform A and B.")
    rank_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's rank_pattern: {regex: r} overriding r at the sites whose module path the regex "
        "matches at its end ('(.*\\.)?<regex>' whole, PEFT's rule); the first matching key wins.")
    lambda_pattern: Mapping[str, float] = spec_field(
        FrozenMapping(), help="PEFT's lambda_pattern: {regex: λ} overriding delora_lambda (the initial λ) the same way.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("delora_lambda", check_real("delora_lambda", self.delora_lambda))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("rank_pattern", check_pattern("rank_pattern", self.rank_pattern, integer=True))
        set_("lambda_pattern", check_pattern("lambda_pattern", self.lambda_pattern, integer=False))

    def rank_lambda(self, *names: str) -> tuple[int, float]:
        """``(r, initial λ)`` at a site known by ``names`` (site name, module path)."""
        return pick(self.rank_pattern, names, self.r), pick(self.lambda_pattern, names, self.delora_lambda)


__all__ = ["DeLoRA"]
