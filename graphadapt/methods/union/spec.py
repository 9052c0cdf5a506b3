"""``Union``: several method specs applied as one named adapter (AdapterHub's ``ConfigUnion``).

The members are trained, saved and activated together; their modules live under
``adapters.<name>.<member key>.<site>`` (member key: the method name, or ``<method>_<i>`` when a method
appears twice). Presets mirror AdapterHub 1.3: :class:`UniPELT` (gated prefix tuning, gated
sequential bottleneck, gated LoRA) and :class:`MAM` (prefix tuning + parallel bottleneck).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, check_seed, register_method, spec_field


def _member(m: Any, i: int) -> MethodSpec:
    if isinstance(m, Mapping):
        m = MethodSpec.from_dict(m)
    if not isinstance(m, MethodSpec):
        raise SpecError(f"Union member {i} must be a method spec (LoRA, SeqBn, PrefixTuning, …) or its dict, got "
                        f"{type(m).__name__}", field="members")
    if isinstance(m, Union):
        raise SpecError(f"Union member {i} is itself a Union; list its members instead", field="members")
    return m


@register_method
@dataclass(frozen=True, init=False)
class Union(MethodSpec):
    """Several methods as one adapter: ``Union(PrefixTuning(), ParBn())``."""

    method: ClassVar[str] = "union"

    members: tuple[MethodSpec, ...] = spec_field((), help="The member method specs (at least one; no nested unions).")

    def __init__(self, *specs: Any, members: Any = None, seed: int | None = None) -> None:
        if specs and members is not None:
            raise SpecError("give the members either positionally or as members=, not both", field="members")
        items = specs if members is None else members
        if isinstance(items, (MethodSpec, Mapping, str)):
            items = (items,)
        object.__setattr__(self, "members", tuple(items))
        object.__setattr__(self, "seed", seed)
        self.__post_init__()

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        members = tuple(_member(m, i) for i, m in enumerate(self.members))
        if not members:
            raise SpecError("a Union needs at least one member", field="members")
        object.__setattr__(self, "members", members)

    @property
    def member_keys(self) -> tuple[str, ...]:
        """Submodule name of each member: its method name, ``<method>_<i>`` when the method repeats."""
        names = [m.method for m in self.members]
        return tuple(n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.preset:
            out["preset"] = self.preset
        out["seed"] = self.seed
        out["members"] = [m.to_dict() for m in self.members]
        return out

    def replace(self, **changes: Any):
        kw = {"members": self.members, "seed": self.seed, **changes}
        return type(self)(members=kw["members"], seed=kw["seed"])

    def includes_layer(self, index: int) -> bool:
        return any(m.includes_layer(index) for m in self.members)


def _preset_members(cls) -> tuple[MethodSpec, ...]:
    """The members of a preset, built through the spec registry (a method folder names other methods only there)."""
    spec = MethodSpec.from_dict
    if cls is UniPELT:  # AdapterHub UniPELTConfig: every component with use_gating=True
        # AdapterHub's LoRAConfig defaults: attention q and v (selfattn), init "lora"
        return (spec({"method": "prefix_tuning", "prefix_length": 10, "use_gating": True}),
                spec({"method": "bottleneck", "preset": "seq_bn", "reduction_factor": 16, "use_gating": True}),
                spec({"method": "lora", "r": 8, "alpha": 2, "use_gating": True, "targets": ("q", "v")}))
    return (spec({"method": "prefix_tuning", "bottleneck_size": 800}),  # AdapterHub MAMConfig
            spec({"method": "bottleneck", "preset": "par_bn"}))


@register_method
@dataclass(frozen=True, init=False)
class UniPELT(Union):
    """UniPELT (Mao et al., 2022): gated PrefixTuning(prefix_length=10) + gated SeqBn(reduction_factor=16) +
    gated LoRA(r=8, alpha=2); AdapterHub ``UniPELTConfig``. Pass ``members=`` to change a component."""

    preset: ClassVar[str] = "unipelt"

    def __init__(self, *specs: Any, members: Any = None, seed: int | None = None) -> None:
        if not specs and members is None:
            members = _preset_members(UniPELT)
        super().__init__(*specs, members=members, seed=seed)


@register_method
@dataclass(frozen=True, init=False)
class MAM(Union):
    """Mix-and-match adapter (He et al., 2021): PrefixTuning(bottleneck_size=800) + ParBn(); AdapterHub
    ``MAMConfig``."""

    preset: ClassVar[str] = "mam"

    def __init__(self, *specs: Any, members: Any = None, seed: int | None = None) -> None:
        if not specs and members is None:
            members = _preset_members(MAM)
        super().__init__(*specs, members=members, seed=seed)


__all__ = ["MAM", "UniPELT", "Union"]
