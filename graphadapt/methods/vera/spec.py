"""VeRA spec (Kopiczko et al., 2024): ``ΔW = diag(λ_b) B diag(λ_d) A`` with frozen random ``A``, ``B`` shared by every
site of the adapter; only the vectors ``λ_b`` (out) and ``λ_d`` (r) train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, check_seed,
                                  register_method, spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class VeRA(LinearTargets, MethodSpec):
    """Vector-based random matrix adaptation (PEFT's ``VeraConfig``)."""

    method: ClassVar[str] = "vera"

    r: int = spec_field(256, help="Rank of the shared random projections A [r, in] and B [out, r] (int > 0).")
    dropout: float = spec_field(0.0, help="Dropout on the VeRA branch input, in [0, 1).")
    d_initial: float = spec_field(0.1, help="Initial value of every entry of λ_d (λ_b starts at zero: the identity).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert VeRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: λ_b = 0, λ_d = d_initial (identity, PEFT's default); False: "
                                               "λ_b = 1, λ_d ~ N(0, 1).")
    projection_prng_key: int | None = spec_field(
        None, help="None: A and B are drawn from the adapter's seeded generator; an int: drawn exactly as PEFT does "
        "from torch.Generator().manual_seed(projection_prng_key) (same A and B as a PEFT VeRA on the same layers).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("d_initial", check_real("d_initial", self.d_initial))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("projection_prng_key", check_seed("projection_prng_key", self.projection_prng_key))


__all__ = ["VeRA"]
