"""VB-LoRA spec (Li et al., 2024): LoRA factors assembled from a trainable vector bank shared by every site of the
adapter — each length-``vector_length`` piece of ``A`` and ``B`` is a softmax-weighted sum of its ``topk`` best bank
vectors, chosen by trainable logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, check_int, check_layer_indices, check_real, register_method, spec_field
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class VBLoRA(LinearTargets, MethodSpec):
    """Vector-bank LoRA (PEFT's ``VBLoRAConfig``)."""

    method: ClassVar[str] = "vblora"

    r: int = spec_field(4, help="Rank of the assembled update B·A (int > 0).")
    num_vectors: int = spec_field(256, help="Vectors in the shared bank.")
    vector_length: int = spec_field(256, help="Length of each bank vector; must divide every adapted in and out.")
    topk: int = spec_field(2, help="Bank vectors mixed per piece (softmax over their logits), <= num_vectors.")
    dropout: float = spec_field(0.0, help="Dropout on the VB-LoRA branch input, in [0, 1).")
    init_vector_bank_bound: float = spec_field(0.02, help="Bank init U(±bound).")
    init_logits_std: float = spec_field(0.1, help="Logits init N(0, std²).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert VB-LoRA: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("num_vectors", check_int("num_vectors", self.num_vectors, minimum=1))
        set_("vector_length", check_int("vector_length", self.vector_length, minimum=1))
        set_("topk", check_int("topk", self.topk, minimum=1))
        if self.topk > self.num_vectors:
            raise SpecError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}", field="topk")
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("init_vector_bank_bound", check_real("init_vector_bank_bound", self.init_vector_bank_bound, 0.0, None))
        set_("init_logits_std", check_real("init_logits_std", self.init_logits_std, 0.0, None))
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))


__all__ = ["VBLoRA"]
