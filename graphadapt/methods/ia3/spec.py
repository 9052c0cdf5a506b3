"""IA3 spec (Liu et al., 2022, "(IA)^3"): learned per-channel rescaling of linear layers.

    output site:       y = W x + b  →  y = l ⊙ (W x + b)          (l: [out])
    feedforward site:  y = W x + b  →  y = W (l ⊙ x) + b          (l: [in])

(``l`` times ``alpha``, or times a learned gate with ``use_gating`` — AdapterHub's form, where
every site scales its output.)

``targets`` says where (roles, ``"all-linear"`` or module-path selectors, exactly as
LoRA (:mod:`graphadapt.spec.targets`)); ``feedforward`` lists which of those targets scale the
layer *input* (PEFT's ``feedforward_modules``); every other target scales the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError

from graphadapt.spec.base import MethodSpec, check_bool, check_layer_indices, is_real, register_method, spec_field
from graphadapt.spec.targets import (TARGET_HELP, LinearTargets, expand_roles, normalise_targets, selector_matches,
                                     target_kind)
from graphadapt.vocab import ALL_LINEAR, ROLES


@register_method
@dataclass(frozen=True)
class IA3(LinearTargets, MethodSpec):
    """Infused Adapter by Inhibiting and Amplifying Inner Activations (PEFT semantics)."""

    method: ClassVar[str] = "ia3"

    targets: tuple[str, ...] = spec_field(("k", "v", "down"), help="Where to insert IA3: " + TARGET_HELP + ".")
    feedforward: tuple[str, ...] = spec_field(
        ("down",),
        help="Targets (a subset of targets: the same role or selector strings; a role is also allowed when "
        "targets holds 'all-linear') whose layer INPUT is scaled (PEFT's feedforward_modules); "
        "all other targets scale the layer output.",
    )
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_ia3_weights: bool = spec_field(
        True, help="True: scaling vectors start at ones (identity, PEFT's default); False: standard normal draws."
    )
    alpha: float = spec_field(
        1.0, help="Constant factor on the scaling vector: l becomes alpha·l (AdapterHub's IA3 alpha; PEFT has none: 1).")
    use_gating: bool = spec_field(
        False, help="AdapterHub gating: a learned sigmoid gate (mean over the sequence) replaces alpha, "
        "y' = g·l ⊙ y. Output scaling only (needs feedforward=()); not mergeable.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("targets", normalise_targets(self.targets))
        set_("feedforward", _normalise_feedforward(self.feedforward, self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("init_ia3_weights", check_bool("init_ia3_weights", self.init_ia3_weights))
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha == 0:
            raise SpecError(f"alpha must be a non-zero finite number, got {self.alpha!r}", field="alpha")
        set_("alpha", float(self.alpha))
        set_("use_gating", check_bool("use_gating", self.use_gating))
        if self.use_gating and self.feedforward:
            raise SpecError(
                f"use_gating=True scales layer outputs only (AdapterHub's gated IA3), but feedforward={list(self.feedforward)} "
                "asks for input scaling; pass feedforward=()", field="use_gating")

    def feedforward_roles(self) -> tuple[str, ...]:
        """Roles whose input is scaled (``"all-linear"`` in ``feedforward`` expands to every role)."""
        return expand_roles(self.feedforward)

    def is_feedforward(self, site: Any) -> bool:
        """Whether ``site`` (a :class:`~graphadapt.structure.types.LinearSite`) scales its input.

        True when its role is a feedforward role, or a feedforward path selector matches its
        module path or its site name (``"...c_attn.v"`` for a fused slice).
        """
        if getattr(site, "role", None) in self.feedforward_roles():
            return True
        names = {n for n in (getattr(site, "module_path", ""), getattr(site, "name", "")) if n}
        return any(selector_matches(s, n) for s in self.feedforward
                   if s != ALL_LINEAR and s not in ROLES for n in names)


def _normalise_feedforward(feedforward: Any, targets: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(feedforward, str):
        feedforward = (feedforward,)
    elif feedforward is None:
        feedforward = ()
    elif isinstance(feedforward, Mapping) or not isinstance(feedforward, Iterable):
        raise SpecError(f"feedforward must be a list of targets (a subset of targets), got {feedforward!r}",
                        field="feedforward")
    out: list[str] = []
    for t in feedforward:
        try:
            target_kind(t)
        except SpecError as e:
            raise SpecError(f"feedforward: {e}", field="feedforward") from e
        covered = t in targets or (t in ROLES and ALL_LINEAR in targets)
        if not covered:
            raise SpecError(
                f"feedforward entry {t!r} is not one of targets {list(targets)}: feedforward must be a subset "
                "of targets (as PEFT's feedforward_modules of target_modules)", field="feedforward")
        if t not in out:
            out.append(t)
    return tuple(out)


__all__ = ["IA3"]
