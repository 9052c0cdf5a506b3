"""LN tuning spec (Zhao et al., 2023, "Tuning LayerNorm in attention"; PEFT ``LNTuningConfig``).

    y = norm(x; γ, β)  →  y = norm(x; γ', β')      (γ', β': trainable copies of the norm's own weights)

The norms are found by pattern on the captured graph (``aten.layer_norm``, ``aten.rms_norm`` and the decomposed
RMSNorm ``pow → mean → add(eps) → rsqrt → mul → mul(weight)``), not by per-architecture module names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, register_method, spec_field


@register_method
@dataclass(frozen=True)
class LNTuning(MethodSpec):
    """Trainable copies of normalisation weights (PEFT semantics)."""

    method: ClassVar[str] = "ln_tuning"

    targets: tuple[str, ...] = spec_field((), help="Norm module-path selectors (glob, 're:<regex>' or dotted path); "
                                          "empty: every normalisation with a weight in the graph.")

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.targets
        if isinstance(t, str):
            t = (t,)
        if isinstance(t, Mapping) or not isinstance(t, Iterable) or not all(isinstance(s, str) and s for s in t):
            raise SpecError(f"targets must be a list of module-path selectors, got {self.targets!r}", field="targets")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(t)))

    def selects(self, module_path: str) -> bool:
        from graphadapt.spec.targets import selector_matches

        return not self.targets or any(selector_matches(s, module_path) for s in self.targets)


__all__ = ["LNTuning"]
