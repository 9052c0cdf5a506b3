"""ReFT specs (Wu et al., 2024, "ReFT: Representation Finetuning"): low-rank interventions on the hidden states a
layer outputs, at the first ``prefix_positions`` and last ``suffix_positions`` real tokens of each row.

``Reft`` is the general form (AdapterHub ``ReftConfig``); ``LoReft`` / ``NoReft`` / ``DiReft`` are AdapterHub's
``loreft`` / ``noreft`` / ``direft`` presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.methods.activations import get_activation
from graphadapt.spec.base import (MethodSpec, check_bool, check_int, check_layer_indices, check_real, override_default,
                                  register_method, spec_field)


@register_method
@dataclass(frozen=True)
class Reft(MethodSpec):
    """``h ← h + Rᵀ(act(W h + b) − R h)`` at the chosen positions of each selected layer's output
    (``− R h`` only with ``subtract_projection``); ``R`` is ``r × hidden`` (orthonormal rows with ``orthogonality``)."""

    method: ClassVar[str] = "reft"

    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices whose output is intervened on; None: every layer.")
    prefix_positions: int = spec_field(3, help="Intervene on the first this-many real tokens of each row "
                                               "(row starts come from attention_mask; left padding is skipped).")
    suffix_positions: int = spec_field(0, help="Intervene on the last this-many real tokens of each row.")
    r: int = spec_field(1, help="Rank of the intervention (rows of R and outputs of W).")
    orthogonality: bool = spec_field(True, help="Keep R's rows orthonormal (torch's Householder parametrisation, as "
                                                "AdapterHub; needs r < hidden).")
    tied_weights: bool = spec_field(False, help="One intervention for prefix and suffix positions (else one each).")
    subtract_projection: bool = spec_field(True, help="Subtract R h from the learned source (LoReFT); False: DiReFT.")
    dropout: float = spec_field(0.05, help="Dropout on the intervened states (training only).")
    non_linearity: str | None = spec_field(None, help="Activation on W h + b (AdapterHub names); None: identity.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("prefix_positions", check_int("prefix_positions", self.prefix_positions, minimum=0))
        set_("suffix_positions", check_int("suffix_positions", self.suffix_positions, minimum=0))
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise SpecError("prefix_positions and suffix_positions are both 0: the intervention would touch no "
                            "position; set at least one", field="prefix_positions")
        set_("r", check_int("r", self.r, minimum=1))
        for k in ("orthogonality", "tied_weights", "subtract_projection"):
            check_bool(k, getattr(self, k))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0, high_open=True))
        if self.non_linearity is not None:
            get_activation(self.non_linearity)


@register_method
@dataclass(frozen=True)
class LoReft(Reft):
    """Low-rank linear subspace ReFT: orthonormal R, projection subtracted (AdapterHub ``LoReftConfig`` / "loreft")."""

    preset: ClassVar[str] = "loreft"


@register_method
@dataclass(frozen=True)
class NoReft(Reft):
    """LoReFT without the orthogonality constraint (AdapterHub ``NoReftConfig`` / "noreft")."""

    preset: ClassVar[str] = "noreft"
    orthogonality: bool = override_default(Reft, "orthogonality", False)


@register_method
@dataclass(frozen=True)
class DiReft(Reft):
    """No orthogonality, no projection subtraction: ``h + Rᵀ act(W h + b)`` (AdapterHub ``DiReftConfig`` / "direft")."""

    preset: ClassVar[str] = "direft"
    orthogonality: bool = override_default(Reft, "orthogonality", False)
    subtract_projection: bool = override_default(Reft, "subtract_projection", False)


PRESETS: dict[str, type[Reft]] = {"loreft": LoReft, "noreft": NoReft, "direft": DiReft}

__all__ = ["DiReft", "LoReft", "NoReft", "PRESETS", "Reft"]
