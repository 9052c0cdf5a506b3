"""SHiRA spec (Bhardwaj et al., 2024): ``ΔW`` is sparse — ``r·(in + out)`` trainable entries of the weight at fixed
(random) positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_seed, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class SHiRA(LinearTargets, MethodSpec):
    """Sparse high-rank adapter (PEFT's ``ShiraConfig``, random mask)."""

    method: ClassVar[str] = "shira"

    r: int = spec_field(32, help="Sets the number of trainable entries per site, r·(in + out) (as many as a rank-r "
                                 "LoRA); must not exceed in·out.")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert SHiRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool = spec_field(True, help="True: the sparse entries start at zero (identity, PEFT's default); "
                                               "False: N(0, 1).")
    random_seed: int | None = spec_field(None, help="None: positions drawn from the adapter's seeded per-site "
                                                    "generator; an int: PEFT's random_mask with this seed at "
                                                    "every site.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_weights", check_bool("init_weights", self.init_weights))
        set_("random_seed", check_seed("random_seed", self.random_seed))


__all__ = ["SHiRA"]
