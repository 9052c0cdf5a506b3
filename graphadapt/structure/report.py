"""A JSON-able view of a :class:`StructureMap` and its table rendering (``graphadapt inspect``)."""

from __future__ import annotations

from .explain import explain_findings, render_why, select
from .signature import StructureSignature, structure_signature
from .types import AttentionBlock, LinearSite, StructureMap


def _shape(s: LinearSite) -> str:
    experts = f" ×{s.num_experts} experts" if s.num_experts else ""
    rows = ", head-interleaved rows" if s.out_rows is not None else ""
    return f"{s.in_features}→{s.out_features}" + (f" (of {s.total_out}{rows})" if s.fused else "") + experts


class StructureReport(dict):
    """The JSON-able structure report; ``print()`` shows it as the ``graphadapt inspect`` table.

    ``why(role, layer=None)`` (alias ``explain``) says which node and which pattern decided
    whether ``role`` (q k v o up gate down, attention, residual, ffn) was found in each layer.
    """

    explanations: list = []   # plain entries from structure.explain.explain_findings
    signature: StructureSignature | None = None   # the typed facts checkpoints record (structure.signature)

    def __str__(self) -> str:
        return format_report(self)

    def why(self, role: str, layer: int | None = None) -> str:
        return render_why(self.explanations, role, layer)

    explain = why

    def why_entries(self, role: str, layer: int | None = None) -> list[dict]:
        """The JSON-able entries behind :meth:`why`."""
        return select(self.explanations, role, layer)


def structure_report(sm: StructureMap) -> StructureReport:
    layers = []
    for layer in sm.layers:
        rows = []

        def add_attn(blk: AttentionBlock, tag: str):
            mixer = [(s.role, s) for s in blk.mixer]
            for role, s in [(r, getattr(blk, r)) for r in ("q", "k", "v", "o")] + list(blk.latent.items()) + mixer:
                if s is not None:
                    role = s.role if blk.form == "mixer" else role
                    rows.append({"block": tag, "role": role, "module": s.name, "shape": _shape(s),
                                 "layout": s.layout, "fused": s.fused, "pattern": s.pattern})
            r = blk.residual
            rows.append({"block": tag, "role": "residual", "module": r.add.name if r else None,
                         "placement": r.placement if r else None,
                         "norm": (r.norm_after or r.norm_before).kind if r and (r.norm_after or r.norm_before) else None,
                         "norm_module": _norm_path(r)})

        add_attn(layer.attention, "attention")
        if layer.cross_attention is not None:
            add_attn(layer.cross_attention, "cross_attention")
        if layer.ffn is not None:
            tag = "moe" if layer.ffn.moe else "ffn"
            moe_sites = [layer.ffn.router, *layer.ffn.experts, layer.ffn.shared_expert_gate]
            for s in [getattr(layer.ffn, r) for r in ("up", "gate", "down")] + moe_sites:
                if s is not None:
                    rows.append({"block": tag, "role": s.role, "module": s.name, "shape": _shape(s),
                                 "layout": s.layout, "fused": s.fused, "pattern": s.pattern})
            r = layer.ffn.residual
            rows.append({"block": tag, "role": "residual", "module": r.add.name if r else None,
                         "placement": r.placement if r else None,
                         "norm": (r.norm_after or r.norm_before).kind if r and (r.norm_after or r.norm_before) else None,
                         "norm_module": _norm_path(r), "activation": layer.ffn.activation})
        a = layer.attention
        layers.append({
            "index": layer.index, "stack": sm.stacks[layer.stack] if layer.stack < len(sm.stacks) else layer.stack,
            "index_in_stack": layer.index_in_stack, "module": layer.module_path,
            "attention": {"form": a.form, "kind": a.kind, "heads": a.num_heads, "kv_heads": a.num_kv_heads},
            "cross_attention": ({"form": layer.cross_attention.form, "heads": layer.cross_attention.num_heads}
                                if layer.cross_attention is not None else None),
            "sites": rows,
        })
    rep = StructureReport({
        "num_layers": len(sm.layers),
        "stacks": sm.stacks,
        "layers": layers,
        "unmatched": [{"what": u.what, "where": u.where, "reason": u.reason} for u in sm.unmatched],
        "pattern_stats": {name: {"tried": st.tried, "matched": st.matched}
                          for name, st in sorted(sm.pattern_stats.items())},
    })
    rep.explanations = explain_findings(sm)
    rep.signature = structure_signature(sm)
    return rep


def _norm_path(r) -> str | None:
    if r is None:
        return None
    n = r.norm_after or r.norm_before
    if n is None:
        return None
    return n.weight.rsplit(".", 1)[0] if n.weight else n.module_path


def format_report(report: dict) -> str:
    """Render the report as a table: layer, role, module path, shape."""
    hdr = ("layer", "stack", "block", "role", "module", "shape / placement")
    rows = [hdr]
    for L in report["layers"]:
        for r in L["sites"]:
            if r["role"] == "residual":
                extra = f"{r.get('placement')} ({r.get('norm') or 'no norm'}: {r.get('norm_module') or '-'})"
                if r.get("activation"):
                    extra += f", act={r['activation']}"
                mod = ""
            else:
                extra = r["shape"] + (" conv1d" if r["layout"] == "conv1d" else "")
                mod = r["module"]
            rows.append((str(L["index"]), f"{L['stack']}[{L['index_in_stack']}]", r["block"], r["role"], mod, extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    a0 = report["layers"][0]["attention"] if report["layers"] else None
    head = f"{report['num_layers']} layer(s) in stack(s) {', '.join(map(str, report['stacks']))}"
    if a0:
        head += f"; attention {a0['form']}, heads {a0['heads']}" + (
            f" (kv {a0['kv_heads']})" if a0["kv_heads"] and a0["kv_heads"] != a0["heads"] else "")
    lines.insert(0, head)
    if report["unmatched"]:
        lines.append("")
        lines.append("not adapted by role (reason):")
        for u in report["unmatched"]:
            lines.append(f"  {u['what']} {u['where']}: {u['reason']}")
    return "\n".join(lines)
