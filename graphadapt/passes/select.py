"""Resolve a linear-site method's ``targets``/``layers`` to the linear sites of a :class:`StructureMap`.

Any spec with the :class:`~graphadapt.spec.targets.LinearTargets` API (``role_targets``,
``path_targets``, ``targets``, ``includes_layer``) is served.

A target that matches nothing raises :class:`SpecError` listing what exists, before
any adapter is built.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch.fx as fx

from ..errors import SpecError
from ..spec.targets import selector_matches
from ..vocab import ALL_LINEAR, ROLES
from ..structure.types import LinearSite, StructureMap


def _whole(site: LinearSite) -> LinearSite:
    """The un-sliced view of a fused projection (what PEFT adapts when given its name)."""
    return dataclasses.replace(site, name=site.module_path, out_features=site.total_out,
                               out_slice=None, split_output=None, role=None, out_rows=None)


def select_linear_sites(sm: StructureMap, method, adapter_name: str) -> list[LinearSite]:
    roles = method.role_targets()
    paths = method.path_targets()
    # name → sites: a weight shared by several layers (ALBERT) is one name used at several nodes
    chosen: dict[str, list[LinearSite]] = {}

    def take(site: LinearSite) -> None:
        group = chosen.setdefault(site.name, [])
        if all(site.node is not g.node or site.out_slice != g.out_slice
               or site.out_rows != g.out_rows for g in group):
            group.append(site)

    layer_ok = method.includes_layer

    role_sites = [s for s in sm.role_sites()]
    found_roles = sorted({s.role for s in role_sites}, key=ROLES.index)
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
            take(s)

    if ALL_LINEAR in getattr(method, "targets", ()):
        for s in _all_linear(sm, method, adapter_name, bool(role_sites)):
            take(s)

    for sel in paths:
        hits: list[LinearSite] = []
        fused_done: set[tuple[str, fx.Node]] = set()
        for s in sm.linear_sites:
            if s.layer is not None and not layer_ok(s.layer):
                continue
            if s.fused and selector_matches(sel, s.name):
                hits.append(s)
            elif selector_matches(sel, s.module_path):
                if s.fused:
                    if (s.module_path, s.node) not in fused_done:
                        fused_done.add((s.module_path, s.node))
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
            take(s)
    # overlapping whole-module and slice selections on one fused projection would double-adapt
    flat = [s for group in chosen.values() for s in group]
    wholes = {s.module_path for s in flat if not s.fused and any(o.fused and o.module_path == s.module_path for o in sm.linear_sites)}
    for s in flat:
        if s.fused and s.module_path in wholes:
            raise SpecError(f"adapter {adapter_name!r} selects both the fused projection "
                            f"{s.module_path!r} and its slice {s.name!r}; choose one.", field="targets")
    return flat + _other_uses(sm, flat)


def _all_linear(sm: StructureMap, method, adapter_name: str, any_role: bool) -> list[LinearSite]:
    """``"all-linear"`` beyond the roles: every other linear site except the output head (PEFT's
    ``all-linear``: every ``nn.Linear`` but the output embedding; here also fused expert weights). A
    fused projection none of whose pieces has a role is adapted whole, as PEFT adapts the module; pieces
    of a projection whose other pieces have roles are adapted piece by piece. Sites outside recognised
    layers have no layer index: a spec restricting ``layers``/``leave_out`` leaves them out."""
    heads = set(sm.output_heads)
    restricted = getattr(method, "layers", None) is not None or bool(getattr(method, "leave_out", ()))
    roled_groups = {(s.weight, s.node) for s in sm.linear_sites if s.fused and s.role is not None}
    out: list[LinearSite] = []
    whole_done: set = set()
    for s in sm.linear_sites:
        if s.role is not None or s.name in heads or (restricted and s.layer is None):
            continue
        if s.layer is not None and not method.includes_layer(s.layer):
            continue
        if s.fused and (s.weight, s.node) not in roled_groups:
            if (s.weight, s.node) not in whole_done:
                whole_done.add((s.weight, s.node))
                out.append(_whole(s))
        else:
            out.append(s)
    if not any_role:
        found = len({(s.weight, s.node) for s in out})
        warnings.warn(
            f"graphadapt: adapter {adapter_name!r}: no attention, feed-forward or expert block was recognised in "
            f"this model, so no role (q, k, v, o, up, down, …) exists; 'all-linear' adapts the {found} linear "
            "layer(s) found by their graph form only, and residual-point or attention methods have no site. "
            "Run `graphadapt inspect --why attention` to see which pattern stopped recognition.",
            UserWarning, stacklevel=2)
        if not out:
            raise SpecError(f"adapter {adapter_name!r}: 'all-linear' found no linear layer in this model (nor any "
                            "recognised block): nothing to adapt. Check `graphadapt inspect`.", field="targets")
    return out


def _other_uses(sm: StructureMap, flat: list[LinearSite]) -> list[LinearSite]:
    """Further nodes reading a chosen (unfused) site's weight: adapted too, by the same module, as
    wrapping the module would (DeBERTa-v2 with ``share_att_key`` projects the relative positions with
    ``key_proj`` as well); merging folds into the weight, which every use reads."""
    chosen = {s.weight: s for s in flat if not s.fused}
    have = {s.node for s in flat}
    extra = []
    for o in sm.linear_sites:
        s = chosen.get(o.weight)
        if s is not None and not o.fused and o.node not in have:
            have.add(o.node)
            extra.append(dataclasses.replace(o, name=s.name, role=s.role, layer=s.layer))
    return extra
