"""VeRA spec in AdapterHub's form (Kopiczko et al., 2024; AdapterHub ``VeraConfig`` / "vera", ``DvoRAConfig`` /
"dvora"): frozen random projections ``A`` [r, in] and ``B`` [out, r] shared by every site of the adapter, and
trainable per-site matrices ``Λ_d`` [r, r] and ``Λ_b`` [out, out] (diagonal at init, full matrices as AdapterHub
trains them): ``ΔW = Λ_b B Λ_d A``, ``y' = y + (alpha / r) · x ΔWᵀ``. With ``magnitude`` (DVoRA) the sum is rescaled
row-wise by a learned magnitude as AdapterHub does: ``y' = m / ‖W + ΔW‖_row ⊙ (y + (alpha / r) · x ΔWᵀ)`` — the
norm reads the *unscaled* ``ΔW`` and ``y`` includes the bias (AdapterHub's formula, not PEFT's DoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_bool, check_choice, check_int, check_layer_indices, check_real,
                                  check_seed, register_method, spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

PROJECTION_INITS = ("vera", "bert", "lora")


@register_method
@dataclass(frozen=True)
class VeraHub(LinearTargets, MethodSpec):
    """Vector-based random matrix adaptation, AdapterHub's formulation (``vera``; ``magnitude=True``: ``dvora``)."""

    method: ClassVar[str] = "vera_hub"

    r: int = spec_field(8, help="Rank of the shared random projections A [r, in] and B [out, r].")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert it: " + TARGET_HELP + ". Every site must "
                                          "have the same shape (A and B are shared), as in AdapterHub.")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    alpha: float = spec_field(8, help="Scaling alpha / r of the update.")
    d_init: float = spec_field(0.1, help="Λ_d starts as d_init · I (AdapterHub vera_d).")
    b_init: float = spec_field(0.0, help="Λ_b starts as b_init · I (AdapterHub vera_b; 0: the adapter starts as identity).")
    dropout: float = spec_field(0.0, help="Dropout on the update's input (training only).")
    magnitude: bool = spec_field(False, help="DVoRA (AdapterHub use_dora): a learned magnitude m rescales y + update by "
                                             "m / ‖W + ΔW‖_row.")
    use_gating: bool = spec_field(False, help="AdapterHub's gate: the update times mean_seq sigmoid(x Gᵀ + g) instead of alpha / r.")
    projection_init: str = spec_field("vera", help="How A and B are drawn: 'vera' (kaiming_uniform_), 'bert' "
                                                   "(N(0, 0.02)), 'lora' (A kaiming a=√5, B zero) — AdapterHub's init_weights.")
    projection_seed: int | None = spec_field(
        None, help="Draw A and B exactly as AdapterHub does with init_weights_seed (torch.manual_seed(seed), then A, "
                   "then B), so a checkpoint that does not store them (a bare base model's) still imports; None: from "
                   "the adapter's own generator.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("alpha", check_real("alpha", self.alpha, 0.0, None, low_open=True))
        set_("d_init", check_real("d_init", self.d_init))
        set_("b_init", check_real("b_init", self.b_init))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0, high_open=True))
        check_bool("magnitude", self.magnitude)
        check_bool("use_gating", self.use_gating)
        check_choice("projection_init", self.projection_init, PROJECTION_INITS)
        set_("projection_seed", check_seed("projection_seed", self.projection_seed))
        if self.magnitude and self.use_gating:
            raise SpecError("magnitude and use_gating cannot both be True (AdapterHub's DVoRA has no gate)",
                            field="use_gating")


__all__ = ["PROJECTION_INITS", "VeraHub"]
