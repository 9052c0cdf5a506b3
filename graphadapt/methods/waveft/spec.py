"""WaveFT spec (Bilican et al., 2025): ``ΔW = scaling · IDWT2(S)`` — a one-level inverse 2-D wavelet transform of a
coefficient matrix ``S`` that is zero except at ``n_frequency`` fixed random entries, whose values train (or ``ΔW =
scaling · S`` without the transform)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.methods.patterns import check_pattern, pick
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import (MethodSpec, check_bool, check_choice, check_int, check_layer_indices, check_real,
                                  register_method, spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

WAVELETS = ("db1",)
"""Wavelet families implemented (PEFT knows more: db2…, sym…, coif…; they are refused with a SpecError)."""


@register_method
@dataclass(frozen=True)
class WaveFT(LinearTargets, MethodSpec):
    """Wavelet fine-tuning (PEFT's ``WaveFTConfig``; the Haar wavelet ``db1``)."""

    method: ClassVar[str] = "waveft"

    n_frequency: int = spec_field(2592, help="Trainable wavelet coefficients per site (int > 0, at most in·out).")
    scaling: float = spec_field(25.0, help="Factor on the reconstructed update (PEFT's default 25).")
    wavelet_family: str = spec_field("db1", help="Wavelet of the inverse transform: 'db1' (Haar, PEFT's default).")
    use_idwt: bool = spec_field(True, help="False: ΔW = scaling·S directly (no inverse wavelet transform).")
    random_loc_seed: int = spec_field(777, help="Seed of the coefficient locations (PEFT's: the same locations for "
                                                "every site of the same shape).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert WaveFT: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: coefficients zero (identity, PEFT's default); False: "
                                               "N(0, 0.01²).")
    n_frequency_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's n_frequency_pattern: {regex: n} overriding n_frequency at the sites whose module "
        "path the regex matches at its end ('(.*\\.)?<regex>' whole, PEFT's rule); the first matching key wins.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("n_frequency", check_int("n_frequency", self.n_frequency, minimum=1))
        set_("scaling", check_real("scaling", self.scaling))
        check_choice("wavelet_family", self.wavelet_family, WAVELETS)
        set_("use_idwt", check_bool("use_idwt", self.use_idwt))
        set_("random_loc_seed", check_int("random_loc_seed", self.random_loc_seed, minimum=0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("n_frequency_pattern", check_pattern("n_frequency_pattern", self.n_frequency_pattern, integer=True))

    def frequencies_at(self, *names: str) -> int:
        """``n_frequency`` at a site known by ``names`` (site name, module path)."""
        return pick(self.n_frequency_pattern, names, self.n_frequency)


__all__ = ["WAVELETS", "WaveFT"]
