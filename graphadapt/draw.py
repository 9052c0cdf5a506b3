"""Pictures of the recognised structure and of the rewritten graph, as SVG (no graphviz needed).

before: a structure report (``graphadapt.inspect(model)``) or an adapted model
after:  an SVG file: one row per layer in graph order, each block (attention, cross-attention,
        feed-forward, experts) with its recognised roles and the residual (⊕, with the norm
        placement); an adapted model's inserted adapter nodes as coloured badges on the sites they
        rewrote (one colour per adapter, legend at the top), with the active composition block
        (Stack, Parallel, Fuse, …) framing the adapters that share a site.

``graphadapt inspect --svg FILE`` and ``adapted.draw(FILE)`` call :func:`draw_report` and
:func:`draw_model`. Everything is computed from the report's rows and the adapter records, so
every architecture the recogniser handles is drawn the same way.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any

from .errors import GraphAdaptError

# block -> (fill, stroke) of its frame; roles inside take the stroke colour
_BLOCK_COLOURS = {
    "attention": ("#e8f0fe", "#3367d6"),
    "cross_attention": ("#fef3e0", "#e37400"),
    "ffn": ("#e6f4ea", "#188038"),
    "moe": ("#f3e8fd", "#8430ce"),
}
_OTHER_BLOCK = ("#f1f3f4", "#5f6368")
# adapter badge colours (colour-blind-safe-ish, distinct from the block colours)
_ADAPTER_COLOURS = ["#d93025", "#9334e6", "#e8710a", "#1a73e8", "#12b5cb", "#f538a0", "#a8a8a8", "#188038"]

_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
_BOX_W, _BOX_H, _GAP = 46, 26, 6
_ROW_H = 74
_LABEL_W = 150


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "middle", weight: str = "normal",
          fill: str = "#202124") -> str:
    return (f"<text x='{x:.1f}' y='{y:.1f}' {_FONT} font-size='{size}' text-anchor='{anchor}' "
            f"font-weight='{weight}' fill='{fill}'>{escape(s)}</text>")


def _rect(x, y, w, h, fill, stroke, rx=4, width=1.0, dash: str | None = None) -> str:
    d = f" stroke-dasharray='{dash}'" if dash else ""
    return (f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' rx='{rx}' fill='{fill}' "
            f"stroke='{stroke}' stroke-width='{width}'{d}/>")


def _line(x1, y1, x2, y2, colour="#9aa0a6", width=1.2) -> str:
    return f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{colour}' stroke-width='{width}'/>"


def _short_role(role: str) -> str:
    return {"expert_gate": "exp.gate", "expert_up": "exp.up", "expert_down": "exp.down",
            "shared_expert_gate": "sh.gate"}.get(role, role)


def _blocks(layer: dict) -> list[tuple[str, list[dict], dict | None]]:
    """(block name, its role rows, its residual row) in the layer's order."""
    order: list[str] = []
    rows: dict[str, list[dict]] = {}
    residual: dict[str, dict] = {}
    for s in layer.get("sites", []):
        b = s.get("block", "?")
        if b not in rows:
            order.append(b)
            rows[b] = []
        if s.get("role") == "residual":
            residual[b] = s
        else:
            rows[b].append(s)
    return [(b, rows[b], residual.get(b)) for b in order]


def _is_attention(block: str) -> bool:
    return "attention" in block


class _Badges:
    """Adapter records grouped by where they are drawn."""

    def __init__(self, records: list, colours: dict[str, str]):
        self.colours = colours
        self.at_site: dict[str, list] = {}        # linear site module path -> records
        self.at_core: dict[tuple[int, str], list] = {}   # (layer, "self"/"cross") -> adapters at the attention core
        self.after_block: dict[tuple[int, str], list] = {}  # (layer, block) -> residual adapters
        self.outside: list = []                   # at the inputs (embeddings): not in a layer
        for r in records:
            kind, role, layer = getattr(r, "kind", ""), getattr(r, "role", "") or "", getattr(r, "layer", None)
            if layer is None:
                self.outside.append(r)
            elif kind in ("linear", "expert"):
                self.at_site.setdefault(r.site, []).append(r)
            elif kind == "attention":
                self.at_core.setdefault((layer, "cross" if "cross" in role else "self"), []).append(r)
            else:  # residual-stream adapters: mh (after attention) or output (after the feed-forward)
                where = "attention" if role in ("mh", "mh_adapter", "attention") else "ffn"
                self.after_block.setdefault((layer, where), []).append(r)


def _badge_row(x: float, y: float, recs: list, colours: dict[str, str]) -> tuple[str, float]:
    """Small coloured adapter badges side by side; a composition node at the site (``method ==
    "composition"``) frames them, labelled with the block it runs there (``Parallel(bn, bn2)``)."""
    parts, cx = [], x
    seen: list[str] = []
    label = None
    for r in recs:
        if getattr(r, "method", "") == "composition":
            label = getattr(r, "composition", None) or "composition"
        elif r.adapter not in seen:
            seen.append(r.adapter)
    for name in seen:
        w = max(22, 6.2 * len(name) + 8)
        c = colours.get(name, "#5f6368")
        parts.append(_rect(cx, y, w, 14, c, c, rx=7))
        parts.append(_text(cx + w / 2, y + 10.5, name, size=9, fill="#ffffff", weight="bold"))
        cx += w + 3
    width = cx - x - 3 if seen else 0
    if label is not None:
        parts.insert(0, _rect(x - 3, y - 3, width + 6, 20, "none", "#202124", rx=9, width=1.0, dash="3,2"))
        # above the frame, left-aligned: below it sits the residual's norm placement
        parts.append(_text(x - 3, y - 6, label, size=9, anchor="start", fill="#202124"))
        width = max(width, 5.6 * len(label) - 8)
    return "".join(parts), width


def _svg(report: dict, title: str, records: list | None = None, adapters: list[str] | None = None,
         composition: Any = None, notes: list[str] | None = None) -> str:
    layers = list(report.get("layers", []))
    records = list(records or [])
    names = list(adapters or dict.fromkeys(r.adapter for r in records))
    colours = {n: _ADAPTER_COLOURS[i % len(_ADAPTER_COLOURS)] for i, n in enumerate(names)}
    badges = _Badges(records, colours)
    methods = {}
    for r in records:
        methods.setdefault(r.adapter, r.method)
    names = [n for n in names if methods.get(n) != "composition"]

    body: list[str] = []
    top = 64 + (22 if names else 0) + (18 if composition is not None else 0) + (26 if badges.outside else 0)
    width = 0.0
    stack_prev = None
    y = top
    for L in layers:
        stack = L.get("stack")
        if stack != stack_prev:
            body.append(_text(12, y + 12, f"{stack}", size=11, anchor="start", weight="bold", fill="#5f6368"))
            y += 18
            stack_prev = stack
        attn = L.get("attention") or {}
        heads = f"{attn.get('heads')}h" + (f"/{attn.get('kv_heads')}kv" if attn.get("kv_heads") not in (None, attn.get("heads")) else "")
        body.append(_text(12, y + 24, f"layer {L.get('index')}", size=12, anchor="start", weight="bold"))
        body.append(_text(12, y + 39, f"{L.get('module', '')}"[-24:], size=8, anchor="start", fill="#5f6368"))
        if attn:
            body.append(_text(12, y + 51, f"{attn.get('form', '')} · {heads}", size=8, anchor="start", fill="#5f6368"))
        x = _LABEL_W
        mid = y + 10 + _BOX_H / 2
        body.append(_line(x - 12, mid, x, mid))
        for block, rows, res in _blocks(L):
            fill, stroke = _BLOCK_COLOURS.get(block, _OTHER_BLOCK)
            inner: list[str] = []
            bx = x + 6
            core_kind = "cross" if block.startswith("cross") else "self"
            out_roles = [s for s in rows if s.get("role") == "o"] if _is_attention(block) else []
            in_roles = [s for s in rows if s not in out_roles]
            items: list[tuple[str, Any]] = [("role", s) for s in in_roles]
            if _is_attention(block):
                items.append(("core", None))
            items += [("role", s) for s in out_roles]
            for kind, s in items:
                if kind == "core":
                    recs = badges.at_core.get((L.get("index"), core_kind), [])
                    inner.append(_rect(bx, y + 10, _BOX_W + 4, _BOX_H, "#ffffff", stroke, rx=13))
                    inner.append(_text(bx + (_BOX_W + 4) / 2, y + 27, "attn", size=10, fill=stroke))
                    w = _BOX_W + 4
                else:
                    recs = badges.at_site.get(s.get("module"), [])
                    fused = s.get("fused")
                    inner.append(_rect(bx, y + 10, _BOX_W, _BOX_H, "#ffffff", stroke, width=1.8 if recs else 1.0))
                    inner.append(_text(bx + _BOX_W / 2, y + 27, _short_role(s.get("role", "?")), size=11,
                                       weight="bold", fill=stroke))
                    if fused:
                        inner.append(_text(bx + _BOX_W / 2, y + 8, "fused", size=7, fill="#5f6368"))
                    w = _BOX_W
                if recs:
                    svg, bw = _badge_row(bx, y + 40, recs, colours)
                    inner.append(svg)
                    w = max(w, bw)
                bx += w + _GAP
            frame_w = bx - x
            body.append(_rect(x, y + 2, frame_w, _ROW_H - 14, fill, stroke, rx=6))
            body.append(_text(x + 4, y + 0, block.replace("_", " "), size=8, anchor="start", fill=stroke))
            body += inner
            x += frame_w
            # residual: ⊕ with the norm placement
            if res is not None:
                body.append(_line(x, mid, x + 10, mid))
                cx = x + 22
                body.append(f"<circle cx='{cx:.1f}' cy='{mid:.1f}' r='10' fill='#ffffff' stroke='#5f6368'/>")
                body.append(_text(cx, mid + 5, "+", size=15, weight="bold", fill="#5f6368"))
                body.append(_text(cx, mid + 24, (res.get("placement") or "").replace("_", "-"), size=8,
                                  fill="#5f6368"))
                x = cx + 10
            after = badges.after_block.get((L.get("index"), "attention" if _is_attention(block) else block), [])
            if after and not block.startswith("cross"):
                body.append(_line(x, mid, x + 8, mid))
                svg, bw = _badge_row(x + 8, mid - 7, after, colours)
                body.append(svg)
                x += bw + 12
            body.append(_line(x, mid, x + 14, mid))
            x += 14
        width = max(width, x)
        y += _ROW_H
    unmatched = [u for u in report.get("unmatched", []) if u.get("what") == "linear"]
    foot = []
    if unmatched:
        where = ", ".join(u.get("where", "?") for u in unmatched[:8]) + (" …" if len(unmatched) > 8 else "")
        foot.append(f"not in a recognised block (select by module path): {where}")
    foot += list(notes or [])
    for line in foot:
        body.append(_text(12, y + 14, line, size=10, anchor="start", fill="#5f6368"))
        y += 16
    width = max(width + 10, 640)

    head = [_text(12, 24, title, size=15, anchor="start", weight="bold"),
            _text(12, 42, f"{report.get('num_layers', len(layers))} layers in {len(report.get('stacks', []))} "
                  f"stack(s): {', '.join(report.get('stacks', []))}", size=10, anchor="start", fill="#5f6368")]
    ly = 62
    if names:
        lx = 12.0
        head.append(_text(lx, ly + 11, "adapters:", size=10, anchor="start", fill="#5f6368"))
        lx += 58
        for n in names:
            label = f"{n} ({methods.get(n, '?')})"
            w = 6.0 * len(label) + 12
            head.append(_rect(lx, ly, w, 15, colours[n], colours[n], rx=7))
            head.append(_text(lx + w / 2, ly + 11, label, size=9, fill="#ffffff", weight="bold"))
            lx += w + 6
        lx += 10
        present = {s.get("block") for L in layers for s in L.get("sites", [])}
        for block, (fill, stroke) in _BLOCK_COLOURS.items():
            if block not in present:
                continue
            head.append(_rect(lx, ly + 1, 12, 12, fill, stroke, rx=2))
            head.append(_text(lx + 16, ly + 11, block.replace("_", " "), size=9, anchor="start", fill=stroke))
            lx += 16 + 6 * len(block) + 10
        width = max(width, lx)
        ly += 22
    if composition is not None:
        head.append(_text(12, ly + 10, f"active composition: {composition!r}  (dashed frame: adapters it combines "
                          "at one site)", size=10, anchor="start"))
        ly += 18
    if badges.outside:
        svg, bw = _badge_row(100, ly + 2, badges.outside, colours)
        head.append(_text(12, ly + 13, "at the inputs:", size=10, anchor="start", fill="#5f6368"))
        head.append(svg)
        roles = ", ".join(sorted({f"{r.adapter} at {r.site}" for r in badges.outside}))
        head.append(_text(100 + bw + 8, ly + 13, roles, size=9, anchor="start", fill="#5f6368"))
    height = y + 16
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}'>"
            f"<rect width='100%' height='100%' fill='#ffffff'/>" + "".join(head) + "".join(body) + "</svg>\n")


def _write(svg: str, path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".svg":
        raise GraphAdaptError(f"draw writes SVG: give a path ending in .svg, got {str(p)!r} (convert to PNG with "
                              "rsvg-convert or a browser)")
    if p.is_dir():
        raise GraphAdaptError(f"{p} is a directory; give a file path ending in .svg")
    try:
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(svg, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        raise GraphAdaptError(f"cannot write {p}: {e}") from e
    return p


def draw_report(report: dict, path: str | os.PathLike, title: str = "recognised structure") -> Path:
    """Write an SVG of a structure report (``graphadapt.inspect(model)``) to ``path``."""
    return _write(_svg(report, title), path)


def draw_model(adapted, path: str | os.PathLike) -> Path:
    """Write an SVG of an adapted model to ``path`` (``adapted.draw(path)``): the recognised layers and
    roles, every inserted adapter node coloured by adapter, and the active composition."""
    spec = adapted.spec
    src = getattr(adapted, "source_class", "model").rsplit(".", 1)[-1]
    notes = []
    if spec.modules_to_save:
        notes.append(f"trained whole (modules_to_save): {', '.join(spec.modules_to_save)}")
    if getattr(adapted, "is_merged", False):
        notes.append("merged: folded adapters are in the base weights; the badges show where they were inserted")
    inactive = [n for n in spec.adapters if n not in set(adapted.active_adapters())]
    if inactive:
        notes.append(f"inactive (drawn, not run): {', '.join(inactive)}")
    svg = _svg(adapted.structure_report, f"{src} adapted by graphadapt", list(adapted.adapter_records),
               list(spec.adapters), spec.composition, notes)
    return _write(svg, path)


__all__ = ["draw_model", "draw_report"]
