"""The method registry: method name → :class:`~graphadapt.methods.base.Method` plugin."""

from __future__ import annotations

from ..errors import SpecError
from ..spec.base import MethodSpec, register_method
from .base import Method

_REGISTRY: dict[str, Method] = {}


def register(method: type[Method] | Method) -> type[Method] | Method:
    """Register a method plugin (class decorator, or call with a class/instance).

    Also registers its spec class, so ``{"method": name, ...}`` dicts, JSON/YAML specs and
    checkpoints resolve to it. Re-registering the same class (a module reload) is harmless.
    """
    inst = method() if isinstance(method, type) else method
    name = inst.name
    spec_cls = getattr(inst, "spec_class", None)
    if not name or spec_cls is None or not issubclass(spec_cls, MethodSpec):
        raise TypeError(f"{type(inst).__qualname__} must set `name` and `spec_class` (a MethodSpec subclass)")
    if spec_cls.method != name:
        raise TypeError(f"{type(inst).__qualname__}.name {name!r} differs from its spec's method {spec_cls.method!r}")
    old = _REGISTRY.get(name)
    if old is not None and type(old).__qualname__ != type(inst).__qualname__:
        raise TypeError(f"method {name!r} is already registered to {type(old).__qualname__}")
    register_method(spec_cls)
    _REGISTRY[name] = inst
    return method


def unregister(name: str) -> None:
    """Remove a method plugin (tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def get_method(key: str | MethodSpec) -> Method:
    """The plugin for a method name or a spec instance (SpecError naming what exists)."""
    name = key.method if isinstance(key, MethodSpec) else key
    if name not in _REGISTRY:
        raise SpecError(f"method {name!r} has no registered plugin; registered: {', '.join(sorted(_REGISTRY))}. "
                        "Register one with graphadapt.methods.register(...)", field="method")
    return _REGISTRY[name]


def registered() -> tuple[Method, ...]:
    """Every registered plugin, in registration order."""
    return tuple(_REGISTRY.values())


__all__ = ["get_method", "register", "registered", "unregister"]
