"""LoRA spec: ``y = W x + b  →  y = W x + b + scaling · B(A(dropout(x)))``.

Where it goes is said with ``targets``: structural roles found in the graph
(``q k v o up gate down``, or ``"all-linear"``) and/or module-path selectors
(glob, ``re:<regex>``, or dotted path), so one spec serves every architecture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (
    MethodSpec,
    check_bool,
    check_choice,
    check_int,
    check_layer_indices,
    check_real,
    is_real,
    register_method,
    spec_field,
)
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

from ..patterns import check_pattern, pick
from .init import LORA_INIT_SCHEMES as LORA_INITS

DORA_FORMS = ("peft", "adapterhub")


@register_method
@dataclass(frozen=True)
class LoRA(LinearTargets, MethodSpec):
    """Low-rank adaptation (Hu et al., 2021), with rsLoRA, DoRA and gating options."""

    method: ClassVar[str] = "lora"

    r: int = spec_field(8, help="Rank of the update B·A (int > 0).")
    alpha: float = spec_field(8, help="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = spec_field(0.0, help="Dropout on the LoRA branch input, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert LoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    use_rslora: bool = spec_field(False, help="Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023).")
    use_dora: bool = spec_field(False, help="Weight-decomposed LoRA (DoRA, Liu et al., 2024): learn a magnitude vector too.")
    dora_form: str = spec_field(
        "peft", help="DoRA's formula: 'peft' (PEFT / the paper: f = m / ‖W + s·BA‖ detached, f ⊙ (W + s·BA) x + b) or "
        "'adapterhub' (AdapterHub's DoRAConfig: f = m / ‖W + BA‖, f ⊙ (y + s·BA x) — the bias is rescaled too; "
        "m starts at ‖W‖). Only read with use_dora.")
    init: str = spec_field(
        "lora",
        help="Initialisation: 'lora' (Kaiming-uniform A, zero B), 'gaussian' (normal A with std 1/r, zero B), "
        "'bert' (normal std 0.02 for A and B, so the output changes at init), "
        "'pissa' (A, B from the top-r SVD of W, residual left in W), 'olora' (A, B from the QR of W, residual left "
        "in W), 'orthogonal' (PEFT's: non-zero A and B with B·A = 0; even r).",
    )
    use_gating: bool = spec_field(False, help="Add a learned sigmoid gate on the branch (UniPELT-style).")
    rank_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's rank_pattern: {regex: r} overriding r where the regex matches the end of a "
        "site's module path ('(.*\\.)?<regex>' must match it whole, e.g. 'q_proj' or 'layers\\.0\\..*'); the first "
        "matching key wins.")
    alpha_pattern: Mapping[str, float] = spec_field(
        FrozenMapping(), help="PEFT's alpha_pattern: {regex: alpha} overriding alpha the same way.")
    lora_bias: bool = spec_field(
        False, help="PEFT's lora_bias: a trainable bias on B (zero at init), y' = y + s·(B·A·x + b_B); the adapted "
        "layers need a bias of their own (merge adds s·b_B to it). Not with DoRA or gating.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SpecError(f"alpha must be a number > 0 (int or float), got {self.alpha!r}", field="alpha")
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("use_rslora", check_bool("use_rslora", self.use_rslora))
        set_("use_dora", check_bool("use_dora", self.use_dora))
        set_("use_gating", check_bool("use_gating", self.use_gating))
        set_("lora_bias", check_bool("lora_bias", self.lora_bias))
        set_("rank_pattern", check_pattern("rank_pattern", self.rank_pattern, integer=True))
        set_("alpha_pattern", check_pattern("alpha_pattern", self.alpha_pattern, integer=False))
        check_choice("init", self.init, LORA_INITS)
        if self.lora_bias and (self.use_dora or self.use_gating):
            raise SpecError("lora_bias cannot be combined with use_dora or use_gating (PEFT has no such variant)",
                            field="lora_bias")
        check_choice("dora_form", self.dora_form, DORA_FORMS)
        if self.use_dora and self.use_gating:
            raise SpecError(
                "use_dora and use_gating cannot both be True: DoRA rescales the merged weight column-wise, "
                "so a gate on the low-rank branch alone would no longer gate the update (and it could not be merged)",
                field="use_gating",
            )

    @property
    def scaling(self) -> float:
        """Factor applied to ``B(A(x))``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (sites picked by
        ``rank_pattern``/``alpha_pattern`` have their own: :meth:`rank_alpha`)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, *names: str) -> tuple[int, float]:
        """``(r, alpha)`` at a site known by ``names`` (its site name, then its module path), PEFT's rule: the
        first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
        return pick(self.rank_pattern, names, self.r), pick(self.alpha_pattern, names, self.alpha)


__all__ = ["DORA_FORMS", "LORA_INITS", "LoRA"]
