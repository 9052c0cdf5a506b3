"""Invertible adapter spec (Pfeiffer et al., 2020, MAD-X): a NICE coupling block on the embedding output.

AdapterHub attaches it to a bottleneck config (``inv_adapter="nice"``: ``seq_bn_inv``, ``double_seq_bn_inv``,
``pfeiffer+inv``, ``houlsby+inv``); graphadapt imports those as ``Union(<bottleneck>, InvertibleAdapter(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.methods.activations import get_activation
from graphadapt.spec.base import MethodSpec, check_choice, check_real, register_method, spec_field

BLOCKS = ("nice",)


@register_method
@dataclass(frozen=True)
class InvertibleAdapter(MethodSpec):
    """``[x1; x2] → [y1; y2]`` with ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` on the stream entering the first layer
    (``F``, ``G``: ``Linear → act → Linear`` with a ``reduction_factor`` bottleneck)."""

    method: ClassVar[str] = "invertible"

    block: str = spec_field("nice", help="Coupling block: 'nice' (AdapterHub's GLOW block is not importable: its "
                                         "forward returns a list concatenated along the sequence axis).")
    reduction_factor: float = spec_field(2.0, help="Bottleneck of F and G: int(half width // reduction_factor).")
    non_linearity: str = spec_field("relu", help="Activation inside F and G (AdapterHub names).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("block", self.block, BLOCKS)
        object.__setattr__(self, "reduction_factor", check_real("reduction_factor", self.reduction_factor, 0.0,
                                                                None, low_open=True))
        get_activation(self.non_linearity)

    def includes_layer(self, index: int) -> bool:  # one site, before every layer
        return True


__all__ = ["BLOCKS", "InvertibleAdapter"]
