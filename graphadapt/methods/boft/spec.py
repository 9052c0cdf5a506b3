"""BOFT spec (Liu et al., 2024, "Parameter-efficient orthogonal finetuning via butterfly factorization";
PEFT ``BOFTConfig``).

    y = x Wᵀ + b  →  y = s ⊙ ((x M) Wᵀ) + b,   M = ∏ P_i blockdiag(Cayley(S_i)) P_iᵀ

``M`` is a product of ``boft_n_butterfly_factor`` butterfly factors (a block-diagonal orthogonal matrix between
fixed permutations), ``s`` a learned output scale. Mergeable: ``W' = s ⊙ (W Mᵀ)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, check_bool, check_int, check_layer_indices, register_method, spec_field
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class BOFT(LinearTargets, MethodSpec):
    """Butterfly orthogonal fine-tuning (PEFT semantics)."""

    method: ClassVar[str] = "boft"

    boft_block_size: int = spec_field(4, help="Channels per orthogonal block (0: derived from boft_block_num); "
                                      "exactly one of boft_block_size and boft_block_num is non-zero.")
    boft_block_num: int = spec_field(0, help="Orthogonal blocks per butterfly factor (0: derived from "
                                     "boft_block_size).")
    boft_n_butterfly_factor: int = spec_field(1, help="Butterfly factors (1: plain block-diagonal OFT with a scale).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert BOFT: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: identity rotations and unit scale (PEFT's default); False: "
                                    "N(0, 0.1²) block parameters and N(1, 0.1²) scales.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("boft_block_size", check_int("boft_block_size", self.boft_block_size, minimum=0))
        set_("boft_block_num", check_int("boft_block_num", self.boft_block_num, minimum=0))
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise SpecError(f"give exactly one of boft_block_size and boft_block_num (the other 0), got "
                            f"{self.boft_block_size} and {self.boft_block_num}", field="boft_block_size")
        set_("boft_n_butterfly_factor", check_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor, minimum=1))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))

    def geometry(self, in_features: int, where: str) -> tuple[int, int]:
        """``(block_num, block_size)`` at a layer with ``in_features`` inputs (PEFT's checks, as SpecErrors)."""
        extra = self.boft_n_butterfly_factor - 1
        if self.boft_block_num:
            num = self.boft_block_num
            if in_features % num:
                raise SpecError(f"{where}: in_features={in_features} is not divisible by boft_block_num={num}",
                                field="boft_block_num")
            if extra and (extra > (num.bit_length() - 1) or num % (2 ** extra)):
                raise SpecError(f"{where}: boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor-1)",
                                field="boft_n_butterfly_factor")
            size = in_features // num
        else:
            size = self.boft_block_size
            if in_features % size:
                raise SpecError(f"{where}: in_features={in_features} is not divisible by boft_block_size={size}",
                                field="boft_block_size")
            if extra and in_features % (size * 2 ** extra):
                raise SpecError(f"{where}: in_features={in_features} must be a multiple of boft_block_size·"
                                f"2^(boft_n_butterfly_factor-1) = {size * 2 ** extra}", field="boft_n_butterfly_factor")
            num = in_features // size
        if extra and (num % 2 or size % 2):
            raise SpecError(f"{where}: butterfly factors need an even block number and size, got {num} × {size}",
                            field="boft_n_butterfly_factor")
        return num, size


__all__ = ["BOFT"]
