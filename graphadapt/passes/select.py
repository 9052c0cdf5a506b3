"""Resolve a method's ``targets``/``layers`` to the linear sites of a :class:`StructureMap`.

A target that matches nothing raises :class:`SpecError` listing what exists, before
any adapter is built.
"""

from __future__ import annotations

import dataclasses

from ..errors import SpecError
from ..spec.lora import selector_matches
from ..structure.types import LinearSite, StructureMap


def _whole(site: LinearSite) -> LinearSite:
    """The un-sliced view of a fused projection (what PEFT adapts when given its name)."""
    return dataclasses.replace(site, name=site.module_path, out_features=site.total_out,
                               out_slice=None, split_output=None, role=None)


def select_linear_sites(sm: StructureMap, method, adapter_name: str) -> list[LinearSite]:
    roles = method.role_targets()
    paths = method.path_targets()
    chosen: dict[str, LinearSite] = {}
    layer_ok = method.includes_layer

    role_sites = [s for s in sm.role_sites()]
    found_roles = sorted({s.role for s in role_sites}, key=lambda r: "q k v o up gate down".split().index(r))
    for role in roles:
        hits = [s for s in role_sites if s.role == role and layer_ok(s.layer)]
        explicit = role in getattr(method, "targets", ())
        if not hits and explicit:
            raise SpecError(
                f"adapter {adapter_name!r}: target role {role!r} matches no site"
                f"{' in the selected layers' if any(s.role == role for s in role_sites) else ''}. "
                f"Roles found in this model: {', '.join(found_roles) or 'none'}; "
                f"layers: 0..{len(sm.layers) - 1}.", field="targets")
        for s in hits:
            chosen[s.name] = s

    for sel in paths:
        hits: list[LinearSite] = []
        fused_done: set[str] = set()
        for s in sm.linear_sites:
            if s.layer is not None and not layer_ok(s.layer):
                continue
            if s.fused and selector_matches(sel, s.name):
                hits.append(s)
            elif selector_matches(sel, s.module_path):
                if s.fused:
                    if s.module_path not in fused_done:
                        fused_done.add(s.module_path)
                        hits.append(_whole(s))
                else:
                    hits.append(s)
        if not hits:
            names = sorted({s.module_path for s in sm.linear_sites})
            shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
            raise SpecError(
                f"adapter {adapter_name!r}: target {sel!r} matches no linear layer. "
                f"Linear layers in this model: {shown}. Use a role "
                f"(q k v o up gate down), a glob such as '*.query', or 're:<regex>'.",
                field="targets")
        for s in hits:
            chosen[s.name] = s
    # overlapping whole-module and slice selections on one fused projection would double-adapt
    wholes = {s.module_path for s in chosen.values() if s.total_out and not s.fused and s.out_features == s.total_out}
    for name in [n for n, s in chosen.items() if s.fused and s.module_path in wholes]:
        raise SpecError(f"adapter {adapter_name!r} selects both the fused projection "
                        f"{chosen[name].module_path!r} and its slice {name!r}; choose one.", field="targets")
    return list(chosen.values())
