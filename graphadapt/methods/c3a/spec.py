"""C3A spec (Chen et al., 2024): ``ΔW`` is block-circulant — ``out/b × in/b`` circulant ``b × b`` blocks, each given
by one trainable length-``b`` kernel; ``y' = y + (block circular convolution of x) / in``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.methods.patterns import FOURIERFT_RULE, check_pattern, pick
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import MethodSpec, check_int, check_layer_indices, register_method, spec_field
from graphadapt.spec.targets import TARGET_HELP, LinearTargets, normalise_targets

C3A_INITS = (True, False, "xavier_uniform", "gaussian", "kaiming_uniform")


@register_method
@dataclass(frozen=True)
class C3A(LinearTargets, MethodSpec):
    """Circular convolution adaptation (PEFT's ``C3AConfig``)."""

    method: ClassVar[str] = "c3a"

    block_size: int = spec_field(256, help="Circulant block size b; must divide every adapted layer's in and out.")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert C3A: " + TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    init_weights: bool | str = spec_field(
        "xavier_uniform", help="Kernel init: True zeros (identity); 'xavier_uniform' (PEFT's default; also False) "
        "U(±√(6/(in+out))); 'gaussian' N(0, 1); 'kaiming_uniform' U(±√(1/in)).")
    block_size_pattern: Mapping[str, int] = spec_field(
        FrozenMapping(), help="PEFT's block_size_pattern: {regex: block size} overriding block_size at the sites whose "
        "module path matches '.*\\.<regex>' whole (PEFT's C3A rule); the first matching key wins.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("block_size", check_int("block_size", self.block_size, minimum=1))
        if self.init_weights not in C3A_INITS or isinstance(self.init_weights, int) and not isinstance(
                self.init_weights, bool):
            raise SpecError(f"init_weights must be one of {C3A_INITS}, got {self.init_weights!r}",
                            field="init_weights")
        set_("targets", normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("block_size_pattern", check_pattern("block_size_pattern", self.block_size_pattern, integer=True))

    def block_size_at(self, *names: str) -> int:
        """``block_size`` at a site known by ``names`` (site name, module path)."""
        return pick(self.block_size_pattern, names, self.block_size, FOURIERFT_RULE)


__all__ = ["C3A", "C3A_INITS"]
