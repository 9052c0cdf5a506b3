"""Unions as a method plugin: one adapter made of several methods (:mod:`.spec`: ``Union``, ``UniPELT``,
``MAM``). Selection and insertion delegate to each member's plugin; the member's modules live under
``adapters.<name>.<member key>.<site>`` and its records carry the union's adapter name, so
``set_active(name)``, save/load, merge and ``eject_prefix(name)`` act on all members at once.

before: ``y = model(x)``  →  after: every member's insertion, in plan order (linear sites, attention cores,
residual points). Members that would claim the same site are refused (``SpecError`` naming both).
Mergeable members (plain LoRA, IA3) fold on ``merge``; the others stay and are reported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.base import Method
from graphadapt.methods.registry import get_method, register, registered
from graphadapt.passes import PassResult

from .spec import MAM, UniPELT, Union

KIND = "union"


@dataclass(frozen=True)
class MemberSite:
    """One site of one union member."""

    member: int
    key: str
    site: Any
    site_key: str
    spec: Any = None


def _member_name(adapter: str, key: str) -> str:
    return f"{adapter}.{key}"


@register
class UnionMethod(Method):
    name = "union"
    spec_class = Union
    site_kind = KIND
    combine = None
    phase = 10
    adapterhub_architectures = ("union",)

    def select(self, sm, spec: Union, adapter):
        out, owner = [], {}
        for i, (m, key) in enumerate(zip(spec.members, spec.member_keys)):
            plugin = get_method(m)
            for site in plugin.select(sm, m, adapter):
                where = (plugin.site_kind, plugin.site_key(site))
                if where in owner and owner[where][0] != i:
                    j, other = owner[where]
                    raise SpecError(
                        f"adapter {adapter!r}: union members {j} ({other}) and {i} ({key}) both claim the "
                        f"{where[0]} site {where[1]}; give them different positions/targets/layers", field="members")
                owner[where] = (i, key)
                out.append(MemberSite(i, key, site, where[1], m))
        return out

    def site_key(self, site: MemberSite) -> str:
        return f"{site.key}:{site.site_key}"

    def physical_sites(self, adapter, site: MemberSite):
        return get_method(site.spec).physical_sites(_member_name(adapter, site.key), site.site)

    def insert(self, gm, ctx, adapter, spec: Union, sites, seed):
        records, modified = [], False
        order = sorted(range(len(spec.members)), key=lambda i: get_method(spec.members[i]).phase)
        for i in order:
            m, key = spec.members[i], spec.member_keys[i]
            plugin = get_method(m)
            mine = [s.site for s in sites if s.member == i]
            if not mine:
                continue
            own = m.seed if m.seed is not None else seed  # a member's own seed wins, as an adapter's does
            res = plugin.insert(gm, ctx, _member_name(adapter, key), m, mine, own)
            modified |= res.modified
            records += [dataclasses.replace(r, adapter=adapter, member=key) for r in res.records]
        return PassResult(gm, modified, {"members": list(spec.member_keys)}, records)

    # -- AdapterHub
    def adapterhub_spec(self, config):
        if isinstance(config, str):
            return {"unipelt": UniPELT, "mam": MAM}.get(config.lower(), lambda: None)()
        if config.get("architecture") != "union":
            return None
        members = []
        for c in config.get("configs") or ():
            arch = c.get("architecture") if isinstance(c, Mapping) else None
            plugins = [p for p in registered() if arch in p.adapterhub_architectures]
            if not plugins:
                raise CheckpointError(f"AdapterHub union member with architecture {arch!r} is not supported by the "
                                      "importer yet")
            spec = None
            for p in plugins:
                spec = p.adapterhub_spec(c)
                if spec is not None:
                    break
            if spec is None:
                raise CheckpointError(f"AdapterHub union member {c!r} does not translate to a graphadapt method")
            members.append(spec)
        def norm(m):  # a preset member (ParBn) equals its plain translation (Bottleneck with ParBn's values)
            return {k: v for k, v in m.to_dict().items() if k != "preset"}

        for preset in (UniPELT, MAM):
            if [norm(m) for m in members] == [norm(m) for m in preset().members]:
                return preset()
        return Union(*members)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        spec = adapted.spec.adapters[adapter]
        archs = [_architecture(m) for m in spec.members]
        if len(set(archs)) != len(archs):
            raise CheckpointError(f"AdapterHub union {directory} has two members of one architecture {archs}; their "
                                  "tensors cannot be told apart by the importer")
        parts: dict[int, dict] = {i: {} for i in range(len(archs))}
        unexpected = []
        for k, v in state_dict.items():
            hits = [i for i, a in enumerate(archs) if _KEYS.get(a, _NEVER)(k, saved_name)]
            if len(hits) == 1:
                parts[hits[0]][k] = v
            else:
                unexpected.append(k)
        if strict and unexpected:
            raise CheckpointError(f"AdapterHub union checkpoint {directory}: {len(unexpected)} tensors belong to no "
                                  f"member (e.g. {unexpected[:3]})")
        for i, (m, key) in enumerate(zip(spec.members, spec.member_keys)):
            view = _MemberView(adapted, adapter, key)
            try:
                get_method(m).load_adapterhub(view, _member_name(adapter, key), saved_name, parts[i], strict,
                                              directory)
            except NotImplementedError as e:
                raise CheckpointError(f"union member {key!r}: the {get_method(m).name} plugin cannot read "
                                      "AdapterHub checkpoints yet") from e


def _architecture(m) -> str | None:
    archs = get_method(m).adapterhub_architectures
    return archs[-1] if archs else get_method(m).name


_NEVER = lambda k, s: False  # noqa: E731
# AdapterHub's key vocabulary per architecture (how its layers name their tensors)
_KEYS = {
    "bottleneck": lambda k, s: f".adapters.{s}." in f".{k}" or f"shared_parameters.{s}." in k,
    "lora": lambda k, s: f".loras.{s}." in f".{k}",
    "prefix_tuning": lambda k, s: re.search(rf"prefix_tuning\.(?:pool\.)?prefix_(?:tunings|gates)\.{re.escape(s)}\.",
                                            k) is not None,
    "prompt_tuning": lambda k, s: f"prompt_tunings.{s}." in k,
    "invertible": lambda k, s: f".invertible_adapters.{s}." in f".{k}",
}


class _MemberView:
    """``adapted`` as one member's loader should see it: only that member's records, named after it."""

    def __init__(self, adapted, adapter: str, key: str):
        self._adapted = adapted
        name = _member_name(adapter, key)
        self.adapter_records = [dataclasses.replace(r, adapter=name) for r in adapted.adapter_records
                                if r.adapter == adapter and r.member == key]

    def __getattr__(self, item):
        return getattr(self._adapted, item)


__all__ = ["MAM", "MemberSite", "UniPELT", "Union", "UnionMethod"]
