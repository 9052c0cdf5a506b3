"""Why-queries: which node and which pattern decided that a role was (or was not) found.

``explain_findings(sm)`` turns a :class:`StructureMap`'s findings into plain, JSON-able entries,
one per (attention candidate, block, role); ``render_why(entries, role, layer)`` answers
"why is there no q projection in layer 3" from them; ``why(sm, role, layer)`` does both.

Layers in a why-query are numbered by position in the graph: every attention core that the
``sdpa``/``eager_attention`` pattern found starts a layer unless it was recognised as a
cross-attention. With every core recognised this is the layer index of the structure report;
a core rejected later (e.g. no q projection) still holds its position, so "layer 3" means the
fourth layer of the model even when it is missing from the report.
"""

from __future__ import annotations

from typing import Any

from ..errors import StructureError
from .ops import module_path, op_name, short_op
from .types import Layer, StructureMap

ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",),
    "up": ("up",), "gate": ("gate",), "down": ("down",),
    "attention": ("attention",), "residual": ("residual",), "norm": ("residual",),
    "ffn": ("ffn", "up", "gate", "down"),
    "mixer_in": ("mixer_in",), "mixer_inner": ("mixer_inner",), "mixer_out": ("mixer_out",),
    "mixer": ("mixer_in", "mixer_inner", "mixer_out"),
}
WHY_ROLES = tuple(ROLE_GROUPS)
_ATTN_ROLES = ("attention", "q", "k", "v", "o", "residual")
_FFN_ROLES = ("ffn", "up", "gate", "down", "residual")
_MIXER_ROLES = ("attention", "mixer_in", "mixer_inner", "mixer_out", "residual")   # structure.mixer


def _value(pattern: str, v) -> str | None:
    if v is None:
        return None
    if hasattr(v, "role") and hasattr(v, "weight"):          # LinearSite
        return v.name
    if hasattr(v, "kind") and hasattr(v, "eps"):              # NormSite
        owner = v.weight.rsplit(".", 1)[0] if v.weight else v.module_path
        return f"{v.kind} {owner or v.output.name}"
    if pattern in ("sdpa", "eager_attention"):
        return v[0].name
    if pattern == "residual_add":
        return v[0].name
    if pattern in ("ffn", "ffn_parallel"):
        return v[0].name
    if pattern == "moe":                                    # structure.moe: the block, named by its router
        return f"mixture of experts routed by {v.router.name}"
    if pattern == "mla":                                    # structure.mla: the latent projections by role
        return "latent attention: " + ", ".join(f"{r} {s.name}" for r, s in v[0].items())
    if pattern == "attention_sinks":                        # structure.patterns: learned sink logits
        return "sink logits " + ", ".join(v[1])
    if pattern == "token_mixer":                            # structure.mixer: (ins, inner, add, ...)
        return "token mixer reading " + ", ".join(x.name for x in v[0]) + f", closing {v[2].name}"
    if pattern == "ffn_gate":
        return f"gate {v[0].name}, up {v[1].name}"
    return None


def _evidence(result) -> dict[str, Any]:
    node = result.node
    return {
        "pattern": result.pattern,
        "matched": bool(result),
        "node": node.name if node is not None else None,
        "op": op_name(node) if node is not None else None,
        "module": module_path(node) if node is not None else "",
        "via": [f"{n.name} ({short_op(n)})" for n in result.via],
        "reason": None if result else result.reason,
        "value": _value(result.pattern, result.value) if result else None,
    }


def explain_findings(sm: StructureMap) -> list[dict[str, Any]]:
    """One plain entry per (attention candidate, block, role), in graph order."""
    if not sm.findings:
        return []
    graph = sm.findings[0].core.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    layer_of: dict[Any, tuple[Layer, str]] = {}
    for L in sm.layers:
        layer_of[L.attention.core] = (L, "attention")
        if L.cross_attention is not None:
            layer_of[L.cross_attention.core] = (L, "cross_attention")
    by_core: dict[Any, list] = {}
    for f in sm.findings:
        by_core.setdefault(f.core, []).append(f)
    cores = sorted({f.core for f in sm.findings if f.role == "attention"}, key=lambda n: order.get(n, -1))
    position, pos = {}, -1
    for c in cores:
        att = [f for f in by_core[c] if f.role == "attention"]
        if not att[0].result:       # a softmax that is not an attention core has no layer position
            continue
        if c in layer_of and layer_of[c][1] == "cross_attention" and pos >= 0:
            position[c] = pos
        else:
            pos += 1
            position[c] = pos
    out = []
    for c in cores:
        L, kind = layer_of.get(c, (None, "attention"))
        dropped = None
        if L is None and c in position:
            missing = [f.role for f in by_core[c] if f.role in ("q", "k", "v") and not f.result]
            dropped = f"no projection found upstream of the core's {'/'.join(missing) or 'q/k/v'} argument"
        mixer = L is not None and kind == "attention" and L.attention.form == "mixer"
        blocks = [(kind, _MIXER_ROLES if mixer else _ATTN_ROLES)]
        if kind == "attention" and position.get(c) is not None:
            blocks.append(("ffn", _FFN_ROLES))
        for block, roles in blocks:
            for role in roles:
                ev = [f.result for f in by_core[c] if f.block == block and (
                    f.role == role or (block == "ffn" and role in ("up", "down", "residual") and f.role == "ffn")
                    or (block == "ffn" and role == "up" and f.role == "gate"))]
                entry = {"layer": position.get(c), "recognised_layer": L.index if L is not None else None,
                         "block": block, "core": c.name, "core_op": op_name(c), "core_module": module_path(c),
                         "role": role, "found": False, "site": None, "placement": None, "dropped": dropped,
                         "evidence": [_evidence(r) for r in ev]}
                if mixer and block == kind:
                    entry["mixer"] = True
                _status(entry, L, block, role, c)
                if entry["layer"] is None and role != "attention":
                    continue
                out.append(entry)
    return out


def _status(entry: dict, L: Layer | None, block: str, role: str, core) -> None:
    if L is None:
        return
    blk = L.attention if block == "attention" else L.cross_attention if block == "cross_attention" else None
    if role == "attention":
        entry["found"], entry["site"] = True, core.name
    elif blk is not None and role.startswith("mixer_"):
        sites = [x for x in [blk.o, *blk.mixer] if x is not None and x.role == role]
        if sites:
            entry["found"], entry["site"] = True, ", ".join(x.name for x in sites)
            entry["site_pattern"] = sites[0].pattern
            entry["site_node"] = sites[0].node.name
    elif blk is not None and role in ("q", "k", "v", "o"):
        s = getattr(blk, role)
        if s is None and role in ("q", "k", "v"):      # MLA (structure.mla): the role's latent up-projection
            s = blk.latent.get("q_b" if role == "q" else "kv_b")
        if s is not None:
            entry["found"], entry["site"] = True, s.name
            entry["site_pattern"] = s.pattern
            entry["site_node"] = s.node.name
    elif role == "residual":
        r = blk.residual if blk is not None else (L.ffn.residual if L.ffn is not None else None)
        if r is not None:
            entry["found"], entry["site"], entry["placement"] = True, r.add.name, r.placement
    elif block == "ffn" and L.ffn is not None:
        s = L.ffn.down if role == "ffn" else getattr(L.ffn, role)
        if role == "ffn" and s is None:   # a mixture of experts without a shared expert: its expert down weight
            s = next((e for e in L.ffn.experts if e.role == "expert_down"), None)
        if s is not None:
            entry["found"], entry["site"] = True, s.name
            entry["site_pattern"] = s.pattern
            entry["site_node"] = s.node.name


def select(entries: list[dict], role: str, layer: int | None = None) -> list[dict]:
    """The entries answering ``why(role, layer)``; raises :class:`StructureError` for an unknown role."""
    if role not in ROLE_GROUPS:
        raise StructureError(f"why: unknown role {role!r}; ask about one of: {', '.join(WHY_ROLES)}")
    roles = ROLE_GROUPS[role]
    return [e for e in entries if e["role"] in roles and e["layer"] is not None
            and (layer is None or e["layer"] == layer)]


def _ev_line(ev: dict) -> str:
    at = f" at {ev['node']} ({ev['op']})" if ev["node"] else ""
    where = f" in {ev['module']}" if ev["module"] else ""
    if ev["matched"]:
        line = f"pattern {ev['pattern']} matched{at}{where}"
        if ev["value"]:
            line += f" → {ev['value']}"
    else:
        line = f"pattern {ev['pattern']} rejected{at}{where}: {ev['reason']}"
    if ev["via"]:
        arrow = " → " if ev["pattern"] == "o_trace" else " ← "
        line += "; traced " + arrow.join(ev["via"][:8]) + (arrow + "…" if len(ev["via"]) > 8 else "")
    return line


def render_why(entries: list[dict], role: str, layer: int | None = None) -> str:
    """Answer "why is there (no) ``role`` in ``layer``" as text (all layers when ``layer`` is None)."""
    chosen = select(entries, role, layer)
    lines: list[str] = []
    positions = sorted({e["layer"] for e in entries if e["layer"] is not None})
    rejected_cores = [e for e in entries if e["role"] == "attention" and e["layer"] is None]
    if not chosen:
        if layer is not None and positions:
            lines.append(f"no layer {layer}: the graph has {len(positions)} attention layer(s), "
                         f"numbered {positions[0]}..{positions[-1]}")
        elif not positions:
            lines.append("no attention core was found, so no layer and no role was recognised")
    last_head = None
    for e in chosen:
        head = (e["layer"], e["block"], e["core"])
        if head != last_head:
            last_head = head
            where = f", in {e['core_module']}" if e["core_module"] else ""
            blk = {"attention": "attention", "cross_attention": "cross-attention", "ffn": "feed-forward"}[e["block"]]
            if e.get("mixer"):
                blk = "token mixer"
            line = f"layer {e['layer']} {blk} (attention core {e['core']}: {e['core_op']}{where})"
            if e["recognised_layer"] is None:
                line += " — not a recognised layer: " + (e["dropped"] or "dropped")
            elif e["recognised_layer"] != e["layer"]:
                line += f" — recognised as layer {e['recognised_layer']}"
            lines.append(line)
        if e["found"]:
            what = f"  {e['role']}: found {e['site']}"
            if e.get("site_pattern"):
                what += f" (node {e['site_node']}, linear form {e['site_pattern']})"
            if e["placement"]:
                what += f", {e['placement']}"
        elif e["role"] == "attention" and e["dropped"]:
            what = f"  {e['role']}: core found, but dropped: {e['dropped']}"
        elif not e["evidence"] and e["dropped"]:
            what = f"  {e['role']}: not searched, the attention core was dropped"
        else:
            what = f"  {e['role']}: not found"
        lines.append(what)
        for ev in e["evidence"]:
            lines.append("    " + _ev_line(ev))
    if rejected_cores and (role == "attention" or not chosen):
        lines.append(f"softmax node(s) that did not form an attention core: {len(rejected_cores)}")
        for e in rejected_cores[:5]:
            where = f" in {e['core_module']}" if e["core_module"] else ""
            lines.append(f"  {e['core']}{where}")
            for ev in e["evidence"]:
                lines.append("    " + _ev_line(ev))
        if len(rejected_cores) > 5:
            lines.append(f"  … and {len(rejected_cores) - 5} more")
    return "\n".join(lines)


def why(sm: StructureMap, role: str, layer: int | None = None) -> str:
    """Why ``role`` was (or was not) found in ``sm``, per layer: the node and pattern that decided it."""
    return render_why(explain_findings(sm), role, layer)
