"""MiSS spec (Kang & Yin, 2024, "MiSS: balancing LoRA performance and efficiency with simple shard sharing";
PEFT ``MissConfig``, formerly Bone).

    y = W x + b  →  y = (W + ΔW) x + b,   ΔW[o, j] = D[j mod r, o]     (one shard D [r, out] shared by all
                                                                         r-wide column blocks of W)

``init_weights="mini"``: ``D`` [r, mini_r] repeated along the outputs; ``"bat"``: block-affine
``ΔW_blocks = W_blocks D + D`` (D [out/r, r, r]; depends on W). Mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import (MethodSpec, check_int, check_layer_indices, check_real, register_method,
                                  spec_field)
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets


@register_method
@dataclass(frozen=True)
class MiSS(LinearTargets, MethodSpec):
    """Matrix shard sharing (PEFT semantics)."""

    method: ClassVar[str] = "miss"

    r: int = spec_field(64, help="Shard width along the input features (int > 0, at most in_features).")
    mini_r: int = spec_field(1, help="Shard width along the outputs with init_weights='mini' (divides out_features).")
    dropout: float = spec_field(0.0, help="Dropout on the shard branch input (PEFT's miss_dropout), in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert MiSS: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool | str = spec_field(True, help="True: the standard shard, zeros (identity); False: the "
                                          "standard shard, kaiming-uniform; 'bat': block-affine form (needs in and "
                                          "out divisible by r); 'mini': shard [r, mini_r] repeated along the outputs.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        set_("mini_r", check_int("mini_r", self.mini_r, minimum=1))
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        if self.init_weights not in (True, False, "bat", "mini"):
            raise SpecError(f"init_weights must be True, False, 'bat' or 'mini', got {self.init_weights!r}",
                            field="init_weights")
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))

    @property
    def mode(self) -> str:
        return self.init_weights if isinstance(self.init_weights, str) else "standard"


__all__ = ["MiSS"]
