"""Base class, registry and validation helpers shared by every method spec.

A method spec (``LoRA``, ``Bottleneck`` …) is a frozen dataclass: validated in
``__post_init__``, hashable, and serialisable to a plain dict tagged with
``"method"`` (and ``"preset"`` for preset subclasses) so :meth:`MethodSpec.from_dict`
can rebuild the exact class. Adding a method means writing its dataclass and
decorating it with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from graphadapt.errors import SpecError

from ._frozen import FrozenMapping

T = TypeVar("T", bound="MethodSpec")

# method name -> class; (method name, preset name) -> preset subclass
_METHODS: dict[str, type[MethodSpec]] = {}
_PRESETS: dict[tuple[str, str], type[MethodSpec]] = {}


def spec_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (every spec field must have one)."""
    if not help:
        raise ValueError("spec fields need help text")
    return field(default=default, metadata={"help": help}, **kwargs)


def override_default(cls: type, name: str, default: Any) -> Any:
    """Redeclare field ``name`` of ``cls`` with a new default, keeping its help text.

    Preset subclasses use this so their fields document themselves exactly like
    the base class's.
    """
    return field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def register_method(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` reachable from :meth:`MethodSpec.from_dict`.

    A class whose own body sets ``preset`` is registered as a preset of its
    ``method``; otherwise it is the method's base class.
    """
    method = getattr(cls, "method", "")
    if not method:
        raise TypeError(f"{cls.__name__} must set the class attribute `method`")
    preset = cls.__dict__.get("preset")
    key: Any = (method, preset) if preset else method
    table: dict = _PRESETS if preset else _METHODS
    existing = table.get(key)
    # Re-registering the same qualified class (module reload) is harmless.
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"{key!r} is already registered to {existing.__qualname__}")
    table[key] = cls
    return cls


def registered_methods() -> tuple[str, ...]:
    """Names accepted in the ``"method"`` key of a spec dict."""
    return tuple(sorted(_METHODS))


def registered_presets(method: str) -> tuple[str, ...]:
    """Preset names registered for ``method``."""
    return tuple(sorted(p for m, p in _PRESETS if m == method))


# ---------------------------------------------------------------- validation
def is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a rank or a layer index is a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be True or False, got {value!r}", field=name)
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise SpecError(f"{name} must be an integer{bound}, got {value!r}", field=name)
    return int(value)


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """Validate a finite real number in the given interval and return it as ``float``."""
    ok = is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        if low is not None and high is not None:
            allowed = f"a number in {lo}, {hi}"
        elif low is not None:
            allowed = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            allowed = f"a number {'<' if high_open else '<='} {high}"
        else:
            allowed = "a finite number"
        raise SpecError(f"{name} must be {allowed}, got {value!r}", field=name)
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise SpecError(
            f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}", field=name
        )
    return value


def check_layer_indices(name: str, value: Any, *, allow_none: bool) -> tuple[int, ...] | None:
    """Normalise a collection of layer indices to a sorted tuple of unique ints >= 0."""
    if value is None and allow_none:
        return None
    what = "None or a list of layer indices (ints >= 0)" if allow_none else "a list of layer indices (ints >= 0)"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise SpecError(f"{name} must be {what}, got {value!r}", field=name)
    items = tuple(value)
    if not all(is_int(i) and i >= 0 for i in items):
        raise SpecError(f"{name} must be {what}, got {value!r}", field=name)
    # Order and repeats carry no meaning; canonicalise so equal selections compare equal.
    return tuple(sorted({int(i) for i in items}))


def check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise SpecError(f"{name} must be None or an integer >= 0, got {value!r}", field=name)
    return int(value)


def _to_plain(value: Any) -> Any:
    """Turn tuples / frozen mappings into lists / dicts that JSON and YAML accept."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- base class
@dataclass(frozen=True)
class MethodSpec:
    """Base of all method specs (LoRA, bottleneck adapters, …).

    Subclasses set ``method`` (the tag written to dicts) and register with
    :func:`register_method`. Preset subclasses also set ``preset``.
    """

    method: ClassVar[str] = ""
    preset: ClassVar[str | None] = None

    seed: int | None = spec_field(
        None,
        help="Initialisation seed of this adapter; None uses the Spec's seed.",
        kw_only=True,
    )

    def __post_init__(self) -> None:
        if type(self) is MethodSpec:
            raise TypeError("MethodSpec is abstract; use LoRA, Bottleneck, …")
        object.__setattr__(self, "seed", check_seed("seed", self.seed))

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-safe) tagged with ``method`` and, for presets, ``preset``."""
        out: dict[str, Any] = {"method": self.method}
        if self.preset:
            out["preset"] = self.preset
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
        """Rebuild a spec from :meth:`to_dict` output, dispatching on ``"method"``/``"preset"``."""
        if isinstance(d, MethodSpec):
            return d  # type: ignore[return-value]
        if not isinstance(d, Mapping):
            raise SpecError(f"a method spec must be a mapping, got {type(d).__name__}", field="method")
        d = dict(d)
        method = d.pop("method", None)
        preset = d.pop("preset", None)
        if method is None:
            if cls is MethodSpec:
                raise SpecError(
                    "a method spec dict needs a 'method' key; registered methods: "
                    + ", ".join(registered_methods()),
                    field="method",
                )
            method = cls.method
        if method not in _METHODS:
            raise SpecError(
                f"unknown method {method!r}; registered methods: {', '.join(registered_methods())}",
                field="method",
            )
        target: type[MethodSpec] = _METHODS[method]
        if preset is not None:
            if (method, preset) not in _PRESETS:
                raise SpecError(
                    f"unknown {method} preset {preset!r}; known presets: "
                    + (", ".join(registered_presets(method)) or "none"),
                    field="preset",
                )
            target = _PRESETS[(method, preset)]
        if not issubclass(target, cls):
            raise SpecError(
                f"{cls.__name__}.from_dict got method {method!r} (a {target.__name__})", field="method"
            )
        names = {f.name: f for f in dataclasses.fields(target)}
        for key in d:
            if key not in names:
                raise SpecError(
                    f"{target.__name__} has no field {key!r}; fields: {', '.join(names)}", field=key
                )
        for f in names.values():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in d:
                raise SpecError(f"{target.__name__} needs a value for {f.name!r}", field=f.name)
        return target(**d)  # type: ignore[return-value]

    # -- introspection
    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}``, for CLIs and documentation."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` applied (re-validated)."""
        return dataclasses.replace(self, **changes)

    def includes_layer(self, index: int) -> bool:
        """Whether this adapter goes into layer ``index`` (``layers`` minus ``leave_out``)."""
        layers = getattr(self, "layers", None)
        if layers is not None and index not in layers:
            return False
        return index not in getattr(self, "leave_out", ())


__all__ = [
    "FrozenMapping",
    "MethodSpec",
    "override_default",
    "register_method",
    "registered_methods",
    "registered_presets",
    "spec_field",
]
