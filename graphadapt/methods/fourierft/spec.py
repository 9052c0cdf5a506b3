"""FourierFT spec (Gao et al., 2024): ``ΔW = scaling · Re(IDFT2(S))`` where the spectrum ``S`` [out, in] is zero except
at ``n_frequency`` fixed random entries, whose values train."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.methods.patterns import FOURIERFT_RULE, check_pattern, pick
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class FourierFT(LinearTargets, MethodSpec):
    """Fourier-transform fine-tuning (PEFT's ``FourierFTConfig``)."""

    method: ClassVar[str] = "fourierft"

    n_frequency: int = spec_field(1000, help="Trainable spectral coefficients per site (int > 0, at most in·out).")
    scaling: float = spec_field(150.0, help="Factor on the inverse DFT (PEFT's default 150).")
    random_loc_seed: int = spec_field(777, help="Seed of the frequency locations (PEFT's: the same locations for "
                                                "every site of the same shape).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert FourierFT: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(False, help="False: coefficients ~ N(0, 1) (PEFT's default: the output changes at "
                                                "init); True: zeros (identity).")
    n_frequency_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's n_frequency_pattern: {regex: n} overriding n_frequency at the sites whose module "
        "path matches '.*\\.<regex>' whole (PEFT's FourierFT rule); the first matching key wins.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("n_frequency", check_int("n_frequency", self.n_frequency, minimum=1))
        set_("scaling", check_real("scaling", self.scaling))
        set_("random_loc_seed", check_int("random_loc_seed", self.random_loc_seed, minimum=0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("n_frequency_pattern", check_pattern("n_frequency_pattern", self.n_frequency_pattern, integer=True))

    def frequencies_at(self, *names: str) -> int:
        """``n_frequency`` at a site known by ``names`` (site name, module path)."""
        return pick(self.n_frequency_pattern, names, self.n_frequency, FOURIERFT_RULE)


__all__ = ["FourierFT"]
