"""AdaLoRA spec (Zhang et al., 2023; PEFT's ``AdaLoraConfig``): an SVD-shaped update ``P Λ Q`` whose rank budget a
:class:`~graphadapt.methods.adalora.allocator.RankAllocator` prunes during training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import (MethodSpec, check_int, check_layer_indices, check_real, is_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class AdaLoRA(LinearTargets, MethodSpec):
    """Adaptive-budget LoRA: ``y' = y + s/(r₀+1e-5) · B (A ⊙ E) x`` with ``E`` the singular values the allocator
    prunes (PEFT's ``SVDLinear``)."""

    method: ClassVar[str] = "adalora"

    init_r: int = spec_field(12, help="Initial rank of every update (PEFT's init_r).")
    target_r: int = spec_field(8, help="Average rank the allocator prunes the budget down to (target_r × sites).")
    alpha: float = spec_field(8, help="Scaling numerator (PEFT's lora_alpha; <= 0 means init_r): the update is "
                              "scaled by alpha / (init_r + 1e-5).")
    dropout: float = spec_field(0.0, help="Dropout on the update's input, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert AdaLoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    tinit: int = spec_field(0, help="Warm-up steps before the budget starts to shrink.")
    tfinal: int = spec_field(0, help="Final steps with the budget fixed at target_r × sites.")
    deltaT: int = spec_field(1, help="Steps between two budget allocations.")
    beta1: float = spec_field(0.85, help="EMA coefficient of the sensitivity, in (0, 1).")
    beta2: float = spec_field(0.85, help="EMA coefficient of the uncertainty, in (0, 1).")
    orth_reg_weight: float = spec_field(0.5, help="Weight of the orthogonality regulariser (>= 0).")
    total_step: int | None = spec_field(None, help="Total training steps (needed by the budget schedule).")
    rank_pattern: Mapping[str, tuple[bool, ...]] = spec_field(
        FrozenMapping(), help="Ranks kept after allocation: {'<module path>.lora_E': [bool per init_r triplet]} "
        "(PEFT's saved rank_pattern); a site found here gets only its kept triplets.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("init_r", check_int("init_r", self.init_r, minimum=1))
        set_("target_r", check_int("target_r", self.target_r, minimum=0))
        if not is_real(self.alpha) or not math.isfinite(self.alpha):
            raise SpecError(f"alpha must be a finite number, got {self.alpha!r}", field="alpha")
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        for k in ("tinit", "tfinal"):
            set_(k, check_int(k, getattr(self, k), minimum=0))
        set_("deltaT", check_int("deltaT", self.deltaT, minimum=1))
        for k in ("beta1", "beta2"):
            v = getattr(self, k)
            if not is_real(v) or not 0 < v < 1:
                raise SpecError(f"{k} must be in (0, 1), got {v!r}", field=k)
        if not is_real(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise SpecError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}", field="orth_reg_weight")
        if self.total_step is not None:
            set_("total_step", check_int("total_step", self.total_step, minimum=1))
            if self.tinit >= self.total_step - self.tfinal:
                raise SpecError(f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no "
                                "budgeting phase: decrease tinit/tfinal or increase total_step", field="total_step")
        set_("rank_pattern", _rank_pattern(self.rank_pattern, self.init_r))

    @property
    def scaling(self) -> float:
        return float(self.alpha) if self.alpha > 0 else float(self.init_r)

    def kept(self, module_path: str) -> tuple[bool, ...] | None:
        """The triplets kept at ``module_path`` by ``rank_pattern`` (a key naming that path, possibly with more in
        front of it), or None."""
        for key, mask in self.rank_pattern.items():
            path = key[: -len(".lora_E")] if key.endswith(".lora_E") else key
            if path == module_path or path.endswith("." + module_path) or module_path.endswith("." + path):
                return mask
        return None


def _rank_pattern(value: Any, init_r: int) -> FrozenMapping:
    if value is None:
        return FrozenMapping()
    if not isinstance(value, Mapping):
        raise SpecError(f"rank_pattern must be a mapping {{path: [bool, ...]}}, got {value!r}", field="rank_pattern")
    out = {}
    for k, v in value.items():
        mask = tuple(bool(b) for b in v)
        if not isinstance(k, str) or len(mask) != init_r:
            raise SpecError(f"rank_pattern[{k!r}] must list init_r={init_r} booleans, got {v!r}", field="rank_pattern")
        out[k] = mask
    return FrozenMapping(out)


__all__ = ["AdaLoRA"]
