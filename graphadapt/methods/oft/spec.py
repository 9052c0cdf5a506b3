"""OFT spec (Qiu et al., 2023; PEFT ``OFTConfig``): orthogonal fine-tuning of linear layers.

    y = x Wᵀ + b  →  y = (x R) Wᵀ + b      (the layer input is rotated first)
    R = blockdiag(R_1 … R_r), each R_i = Cayley(S_i) of a learned skew-symmetric block S_i.

``r`` blocks of ``oft_block_size`` channels (give one of the two, the other 0, as PEFT). Mergeable: ``W' = W Rᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class OFT(LinearTargets, MethodSpec):
    """Orthogonal fine-tuning: a block-diagonal rotation of each targeted layer's input (PEFT semantics)."""

    method: ClassVar[str] = "oft"

    r: int = spec_field(0, help="Number of rotation blocks per layer (0: derived from oft_block_size). "
                        "Exactly one of r and oft_block_size is non-zero; a value that does not divide the "
                        "layer's input width is moved to the nearest divisor, as PEFT does.")
    oft_block_size: int = spec_field(32, help="Channels per rotation block (0: derived from r).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert OFT: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    coft: bool = spec_field(False, help="Constrained OFT: each block's skew parameters are projected into a ball of "
                            "radius eps around zero before use.")
    eps: float = spec_field(6e-5, help="COFT radius (only with coft=True).")
    block_share: bool = spec_field(False, help="One rotation block shared by all blocks of a layer.")
    use_cayley_neumann: bool = spec_field(True, help="Approximate the Cayley transform by a truncated Neumann series "
                                          "(PEFT's default); False: the exact (I - S)(I + S)⁻¹.")
    num_cayley_neumann_terms: int = spec_field(5, help="Terms of the Neumann series (with use_cayley_neumann).")
    init_weights: bool = spec_field(True, help="True: zero skew parameters (identity rotation, PEFT's default); "
                                    "False: N(0, 0.1²) draws.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=0))
        set_("oft_block_size", check_int("oft_block_size", self.oft_block_size, minimum=0))
        if (self.r == 0) == (self.oft_block_size == 0):
            raise SpecError(f"give exactly one of r and oft_block_size (the other 0), got r={self.r}, "
                            f"oft_block_size={self.oft_block_size}", field="r")
        if self.oft_block_size == 1:
            raise SpecError("oft_block_size must be at least 2 (a 1×1 rotation has no parameter)",
                            field="oft_block_size")
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        for k in ("coft", "block_share", "use_cayley_neumann", "init_weights"):
            set_(k, check_bool(k, getattr(self, k)))
        set_("eps", check_real("eps", self.eps, 0.0, None, low_open=True))
        set_("num_cayley_neumann_terms", check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms,
                                                   minimum=1))


__all__ = ["OFT"]
