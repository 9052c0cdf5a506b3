"""Prefix tuning spec (Li & Liang, 2021) with AdapterHub's ``PrefixTuningConfig`` options.

At every selected attention core, ``prefix_length`` learned key and value vectors are prepended
(``K' = [P_k; K]``, ``V' = [P_v; V]``) and every query may attend to them. The vectors of all
layers come from one module: directly learned (``flat=True``) or reparametrised
``embedding(prefix_length, hidden) → Linear(hidden, bottleneck_size) → non_linearity →
Linear(bottleneck_size, layers·2·kv_heads·head_dim)`` (``flat=False``; :func:`eject_prefix`
replaces it by its output for inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (
    MethodSpec,
    check_bool,
    check_int,
    check_layer_indices,
    check_real,
    register_method,
    spec_field,
)

from graphadapt.methods.activations import ACTIVATIONS as _ACTIVATIONS

ACTIVATIONS: tuple[str, ...] = tuple(sorted(_ACTIVATIONS))


@register_method
@dataclass(frozen=True)
class PrefixTuning(MethodSpec):
    """Prefix tuning: learned key/value vectors prepended at every attention core."""

    method: ClassVar[str] = "prefix_tuning"

    prefix_length: int = spec_field(30, help="Number of prefix key/value vectors per attention core (int > 0).")
    bottleneck_size: int = spec_field(512, help="Width of the reparametrisation MLP (flat=False; int > 0).")
    non_linearity: str = spec_field("tanh", help="Activation of the reparametrisation MLP: " + ", ".join(ACTIVATIONS) + ".")
    flat: bool = spec_field(False, help="Learn the prefix vectors directly instead of through the MLP.")
    dropout: float = spec_field(0.0, help="Dropout on the prefix vectors, in [0, 1).")
    encoder_prefix: bool = spec_field(True, help="Add prefixes to the encoder's self-attention (encoder-decoder models).")
    cross_prefix: bool = spec_field(True, help="Add prefixes to cross-attention (encoder-decoder models).")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based, over all stacks) that get no prefix.")
    use_gating: bool = spec_field(False, help="Scale the prefix by a learned sigmoid gate of the block input (UniPELT).")
    shared_gating: bool = spec_field(True, help="One gate for keys and values (else one each); with use_gating.")
    layers: tuple[int, ...] | None = spec_field(
        None, help="Layer indices (0-based) to adapt; None means every layer (leave_out still applies).")
    position_offset: bool = spec_field(
        False, help="PEFT's form: count the real tokens' positions from prefix_length, as if the prefix were a "
        "KV cache before them (decoder models whose position ids are computed in the graph).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("prefix_length", check_int("prefix_length", self.prefix_length, minimum=1))
        set_("bottleneck_size", check_int("bottleneck_size", self.bottleneck_size, minimum=1))
        name = self.non_linearity.lower() if isinstance(self.non_linearity, str) else self.non_linearity
        if name not in ACTIVATIONS:
            raise SpecError(f"non_linearity must be one of {', '.join(ACTIVATIONS)}; got {self.non_linearity!r}",
                            field="non_linearity")
        set_("non_linearity", name)
        for f in ("flat", "encoder_prefix", "cross_prefix", "use_gating", "shared_gating", "position_offset"):
            check_bool(f, getattr(self, f))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))

    @property
    def locations(self) -> tuple[str, ...]:
        """AdapterHub's location keys this spec adds prefixes at."""
        return ("self_prefix",) + (("encoder_prefix",) if self.encoder_prefix else ()) + (
            ("cross_prefix",) if self.cross_prefix else ())


__all__ = ["ACTIVATIONS", "PrefixTuning"]
