"""A versioned structure signature: the recognised structure as typed facts, for checkpoints.

A checkpoint records the signature of the structure it was saved on; loading compares it with the
model's and, when they differ, says what differs ("layer 0 attention.q: out_features 32 (saved) vs 64
(this model)"). The facts are numbers and closed-set values read from the :class:`StructureMap`,
never the inspect report's display strings or pattern names, so rewording the report or renaming a
pattern leaves every saved signature valid.

What counts, per layer (in graph order):

- which stack of layers it belongs to (by number: encoder 0, decoder 1), the head and kv-head counts of its
  self-attention and, if any, of its cross-attention;
- every role site (``attention.q``, ``ffn.down``, ``moe.expert_up``, ...): in and out features, the
  weight layout (``linear``/``conv1d``), the fused width and this role's slice of it (or that its rows
  are head-interleaved), the expert count;
- every residual (``attention``, ``cross_attention``, ``ffn``/``moe``): the norm placement
  (``post_ln``/``pre_ln``/``none``) and the norm kind (``layer_norm``/``rms_norm``).

What does not: module paths, stack paths included (the same encoder behind another head or wrapper matches; paths are
mapped separately), the attention implementation (``sdpa`` vs ``eager``: the same weights), the
activation function's name, pattern names.

Versions. ``SIGNATURE_VERSION`` is written with every signature; change the facts or their meaning
only together with a new version (and keep reading the old one). Checkpoints written before the
signature existed hold only ``structure_fingerprint``, a sha256 of the report's layers with module
paths left out (display strings and pattern names included): :attr:`StructureSignature.v0_digest`
recomputes it from the same facts with a frozen copy of that old rendering, so such checkpoints are
still compared exactly, and no later change to the report can break them. If a pattern is renamed,
map its new name to the old one in ``_V0_PATTERN_NAMES``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .types import AttentionBlock, LinearSite, ResidualSite, StructureMap

SIGNATURE_VERSION = 1
KNOWN_VERSIONS = (1,)

# pattern renamed since the v0 fingerprint was defined: {current name: name in v0 checkpoints}
_V0_PATTERN_NAMES: dict[str, str] = {}


@dataclass(frozen=True)
class SiteFacts:
    """One role's linear computation."""

    in_features: int
    out_features: int
    layout: str                              # "linear" (weight [out, in]) or "conv1d" ([in, out])
    fused_width: int | None = None           # width of the fused projection this role is a part of
    out_slice: tuple[int, int] | None = None  # this role's channels of it (contiguous split)
    interleaved: bool = False                # ... or its head-interleaved rows
    num_experts: int | None = None


@dataclass(frozen=True)
class ResidualFacts:
    placement: str              # "post_ln", "pre_ln" or "none"
    norm: str | None = None     # "layer_norm" or "rms_norm"


@dataclass(frozen=True)
class LayerFacts:
    stack: int                  # which chain of layers (0, or encoder 0 / decoder 1); not its module path
    heads: int | None
    kv_heads: int | None
    cross_heads: int | None     # None: no cross-attention, or its head count unknown
    has_cross_attention: bool
    sites: tuple[tuple[str, SiteFacts], ...]          # ("attention.q", facts), sorted by key
    residuals: tuple[tuple[str, ResidualFacts], ...]  # ("attention", facts), sorted by block


@dataclass(frozen=True)
class StructureSignature:
    """The typed facts of a recognised structure; ``digest`` identifies them, ``differences`` names
    what differs from another signature."""

    layers: tuple[LayerFacts, ...]
    version: int = SIGNATURE_VERSION
    v0_digest: str | None = field(default=None, compare=False)   # the pre-signature fingerprint

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def digest(self) -> str:
        return _sha256(self._facts())

    def _facts(self) -> dict:
        kinds: list[dict] = []
        order: list[int] = []
        for layer in self.layers:
            d = _layer_dict(layer)
            if d not in kinds:
                kinds.append(d)
            order.append(kinds.index(d))
        return {"version": self.version, "kinds": kinds, "layers": order}

    def to_dict(self) -> dict:
        """JSON-able: ``{"version", "digest", "kinds": [distinct layer facts], "layers": [kind per layer]}``."""
        facts = self._facts()
        return {"version": facts["version"], "digest": _sha256(facts), "kinds": facts["kinds"],
                "layers": facts["layers"]}

    @classmethod
    def from_dict(cls, data: dict) -> StructureSignature:
        """Inverse of :meth:`to_dict` (version :data:`SIGNATURE_VERSION` only). Raises ``ValueError`` for
        an unknown version, a malformed record, or a digest that does not match its facts."""
        if not isinstance(data, dict) or data.get("version") not in KNOWN_VERSIONS:
            raise ValueError(f"unknown structure signature version {data.get('version') if isinstance(data, dict) else data!r}"
                             f" (this graphadapt reads {list(KNOWN_VERSIONS)})")
        try:
            kinds = [_layer_from_dict(k) for k in data["kinds"]]
            sig = cls(layers=tuple(kinds[i] for i in data["layers"]), version=data["version"])
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"malformed structure signature ({type(e).__name__}: {e})") from e
        if data.get("digest") != sig.digest:
            raise ValueError("structure signature digest does not match its facts (hand-edited?)")
        return sig

    def differences(self, other: StructureSignature, limit: int = 6) -> list[str]:
        """What differs, ``self`` first (e.g. the saved signature) and ``other`` second; [] if equal."""
        out: list[str] = []
        if self.num_layers != other.num_layers:
            out.append(f"{self.num_layers} layer(s) vs {other.num_layers}")
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            if a == b:
                continue
            for name in ("stack", "heads", "kv_heads", "has_cross_attention", "cross_heads"):
                if getattr(a, name) != getattr(b, name):
                    out.append(f"layer {i}: {name} {getattr(a, name)} vs {getattr(b, name)}")
            for what, x, y in (("site", dict(a.sites), dict(b.sites)), ("residual", dict(a.residuals), dict(b.residuals))):
                for key in sorted(set(x) | set(y)):
                    if key not in y:
                        out.append(f"layer {i}: {what} {key} only in the first")
                    elif key not in x:
                        out.append(f"layer {i}: {what} {key} only in the second")
                    elif x[key] != y[key]:
                        diffs = [f"{f} {getattr(x[key], f)} vs {getattr(y[key], f)}"
                                 for f in x[key].__dataclass_fields__ if getattr(x[key], f) != getattr(y[key], f)]
                        out.append(f"layer {i} {key}: " + ", ".join(diffs))
        if len(out) > limit:
            out = out[:limit] + [f"... and {len(out) - limit} more"]
        return out


def structure_signature(sm: StructureMap) -> StructureSignature:
    """The signature of ``sm`` (with its :attr:`~StructureSignature.v0_digest`)."""
    layers = []
    for layer in sm.layers:
        sites: list[tuple[str, SiteFacts]] = []
        residuals: list[tuple[str, ResidualFacts]] = []
        blocks: list[tuple[str, list[LinearSite], ResidualSite | None]] = []
        for tag, blk in (("attention", layer.attention), ("cross_attention", layer.cross_attention)):
            if blk is not None:
                blocks.append((tag, [s for s in (blk.q, blk.k, blk.v, blk.o) if s is not None], blk.residual))
        if layer.ffn is not None:
            f = layer.ffn
            tag = "moe" if f.moe else "ffn"
            found = [f.up, f.gate, f.down, f.router, *f.experts, f.shared_expert_gate]
            blocks.append((tag, [s for s in found if s is not None], f.residual))
        for tag, found, residual in blocks:
            for s in found:
                key = f"{tag}.{s.role}"
                n = sum(1 for k, _ in sites if k == key or k.startswith(key + "#"))
                sites.append((f"{key}#{n + 1}" if n else key, _site_facts(s)))
            if residual is not None:
                norm = residual.norm_after or residual.norm_before
                residuals.append((tag, ResidualFacts(placement=residual.placement, norm=norm.kind if norm else None)))
        cross = layer.cross_attention
        layers.append(LayerFacts(stack=layer.stack, heads=layer.attention.num_heads, kv_heads=layer.attention.num_kv_heads,
                                 cross_heads=cross.num_heads if cross is not None else None,
                                 has_cross_attention=cross is not None, sites=tuple(sorted(sites)),
                                 residuals=tuple(sorted(residuals))))
    return StructureSignature(layers=tuple(layers), v0_digest=_v0_digest(sm))


def _site_facts(s: LinearSite) -> SiteFacts:
    return SiteFacts(in_features=s.in_features, out_features=s.out_features, layout=s.layout,
                     fused_width=s.total_out if s.fused else None,
                     out_slice=tuple(s.out_slice) if s.out_slice is not None else None,
                     interleaved=s.out_rows is not None, num_experts=s.num_experts)


def _layer_dict(layer: LayerFacts) -> dict:
    return {"stack": layer.stack, "heads": layer.heads, "kv_heads": layer.kv_heads,
            "cross_attention": {"heads": layer.cross_heads} if layer.has_cross_attention else None,
            "sites": {k: {"in": f.in_features, "out": f.out_features, "layout": f.layout, "fused_width": f.fused_width,
                          "slice": list(f.out_slice) if f.out_slice is not None else None,
                          "interleaved": f.interleaved, "experts": f.num_experts} for k, f in layer.sites},
            "residuals": {k: {"placement": r.placement, "norm": r.norm} for k, r in layer.residuals}}


def _layer_from_dict(d: dict) -> LayerFacts:
    sites = tuple(sorted((k, SiteFacts(in_features=f["in"], out_features=f["out"], layout=f["layout"],
                                       fused_width=f["fused_width"],
                                       out_slice=tuple(f["slice"]) if f["slice"] is not None else None,
                                       interleaved=f["interleaved"], num_experts=f["experts"]))
                         for k, f in d["sites"].items()))
    residuals = tuple(sorted((k, ResidualFacts(placement=r["placement"], norm=r["norm"]))
                             for k, r in d["residuals"].items()))
    cross = d["cross_attention"]
    return LayerFacts(stack=d["stack"], heads=d["heads"], kv_heads=d["kv_heads"],
                      cross_heads=cross["heads"] if cross is not None else None, has_cross_attention=cross is not None,
                      sites=sites, residuals=residuals)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the v0 fingerprint (checkpoints written before the signature): frozen, do not edit ---------------

def _v0_shape(s: LinearSite) -> str:
    experts = f" ×{s.num_experts} experts" if s.num_experts else ""
    rows = ", head-interleaved rows" if s.out_rows is not None else ""
    return f"{s.in_features}→{s.out_features}" + (f" (of {s.total_out}{rows})" if s.fused else "") + experts


def _v0_digest(sm: StructureMap) -> str:
    """sha256 of the v0 report's layers without module paths, exactly as graphadapt 0.1.0 wrote it."""
    def site_row(tag: str, role, s: LinearSite) -> dict:
        return {"block": tag, "role": role, "shape": _v0_shape(s), "layout": s.layout, "fused": s.fused,
                "pattern": _V0_PATTERN_NAMES.get(s.pattern, s.pattern)}

    def residual_row(tag: str, r: ResidualSite | None) -> dict:
        norm = (r.norm_after or r.norm_before) if r is not None else None
        return {"block": tag, "role": "residual", "placement": r.placement if r else None,
                "norm": norm.kind if norm is not None else None}

    def attention_rows(blk: AttentionBlock, tag: str) -> list[dict]:
        rows = [site_row(tag, role, getattr(blk, role)) for role in ("q", "k", "v", "o") if getattr(blk, role) is not None]
        return rows + [residual_row(tag, blk.residual)]

    layers = []
    for layer in sm.layers:
        rows = attention_rows(layer.attention, "attention")
        if layer.cross_attention is not None:
            rows += attention_rows(layer.cross_attention, "cross_attention")
        if layer.ffn is not None:
            f = layer.ffn
            tag = "moe" if f.moe else "ffn"
            found = [f.up, f.gate, f.down, f.router, *f.experts, f.shared_expert_gate]
            rows += [site_row(tag, s.role, s) for s in found if s is not None]
            rows.append({**residual_row(tag, f.residual), "activation": f.activation})
        a, c = layer.attention, layer.cross_attention
        layers.append({"index": layer.index, "index_in_stack": layer.index_in_stack,
                       "attention": {"form": a.form, "kind": a.kind, "heads": a.num_heads, "kv_heads": a.num_kv_heads},
                       "cross_attention": {"form": c.form, "heads": c.num_heads} if c is not None else None,
                       "sites": rows})
    return hashlib.sha256(json.dumps(layers, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["KNOWN_VERSIONS", "SIGNATURE_VERSION", "LayerFacts", "ResidualFacts", "SiteFacts", "StructureSignature",
           "structure_signature"]
