"""Data types of a :class:`StructureMap`: what recognition found in a captured graph.

Every site holds references to ``torch.fx.Node`` objects of the graph it was
recognised in; passes read them, rewrite around them, and never rely on module
names to decide a role (module paths are kept only so users can select sites by
name and read reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx as fx

from ..vocab import ROLES


@dataclass
class LinearSite:
    """One linear-like computation ``y = x W^T + b`` normalised from its ATen form.

    ``input``/``output`` are the N-d activations (for GPT-2's Conv1D, the nodes
    before the flattening ``view`` and after the un-flattening ``view`` around
    ``addmm``), so a branch inserted here sees ``[..., in_features]`` and returns
    ``[..., out_features]`` whatever the ATen form.

    For a fused projection that is split afterwards (GPT-2 ``c_attn``), one
    site per slice is produced: ``out_slice`` is the half-open channel range of
    the fused output that belongs to this role and ``total_out`` the fused width.
    """

    name: str                      # unique, dotted: module path (+ ".q" for a fused slice)
    module_path: str               # from nn_module_stack; "" when unknown
    node: fx.Node                  # the aten.linear / addmm / mm node
    input: fx.Node
    output: fx.Node
    weight: str                    # qualified parameter name in the captured module
    bias: str | None
    in_features: int
    out_features: int              # width of this site (the slice width for fused)
    layout: Literal["linear", "conv1d"] = "linear"  # weight [out,in] vs [in,out]
    out_slice: tuple[int, int] | None = None
    total_out: int | None = None   # fused width; equals out_features when not fused
    split_output: fx.Node | None = None  # fused only: the node holding this slice after the split
    role: str | None = None        # q k v o up gate down, once recognised
    layer: int | None = None       # global layer index, once recognised
    pattern: str | None = None     # the linear-form pattern that matched (``structure.patterns``)
    # mixture-of-experts sites (``structure.moe``): ``weight`` is a 3-d [E, out, in] (or [E, in, out],
    # layout "conv1d") parameter, each row of ``input`` uses the expert ``routing`` assigns it
    # (grouped form: the per-expert row offsets, rows sorted by expert)
    num_experts: int | None = None
    routing: fx.Node | None = None
    # fused, head-interleaved (GPT-NeoX, Falcon, Bloom): this role's channels of the fused output,
    # in the order the role's tensor lays them out (head-major); exclusive with ``out_slice``
    out_rows: tuple[int, ...] | None = None

    @property
    def fused(self) -> bool:
        return self.out_slice is not None or self.out_rows is not None


@dataclass
class NormSite:
    """A normalisation: ``aten.layer_norm`` or the decomposed RMSNorm pattern."""

    kind: Literal["layer_norm", "rms_norm"]
    input: fx.Node
    output: fx.Node
    weight: str | None
    bias: str | None
    eps: float
    module_path: str = ""
    weight_offset: float = 0.0     # Gemma-style norms scale by (offset + weight)


@dataclass
class ResidualSite:
    """The residual add closing a sub-block: ``add = branch + stream``.

    ``branch`` is the sub-block output ``h`` (after its output projection and
    dropout), ``stream`` the residual ``in``. ``norm_after`` is the norm whose
    input is ``add`` (post-LN models); ``norm_before`` the norm applied to the
    stream at the sub-block's entry (pre-LN models).
    """

    add: fx.Node
    branch: fx.Node
    stream: fx.Node
    norm_after: NormSite | None = None
    norm_before: NormSite | None = None
    parallel_with: fx.Node | None = None   # parallel blocks (GPT-J, NeoX, Phi): the sibling's output

    @property
    def placement(self) -> Literal["post_ln", "pre_ln", "none"]:
        if self.norm_after is not None:
            return "post_ln"
        if self.norm_before is not None:
            return "pre_ln"
        return "none"


@dataclass
class AttentionBlock:
    core: fx.Node                          # SDPA node, or the second matmul of the eager form
    form: Literal["sdpa", "eager", "mixer"]   # "mixer": a token mixer without softmax (structure.mixer)
    self_attention: bool
    q: LinearSite | None = None
    k: LinearSite | None = None
    v: LinearSite | None = None
    o: LinearSite | None = None
    residual: ResidualSite | None = None
    softmax: fx.Node | None = None         # eager form only
    fused_qkv: LinearSite | None = None    # q/k/v fused without a contiguous channel split
    num_heads: int | None = None
    num_kv_heads: int | None = None
    latent: dict[str, LinearSite] = field(default_factory=dict)   # MLA (structure.mla): q_a, q_b, kv_a, kv_b
    # a token mixer (form "mixer", structure.mixer): its mixer_in / mixer_inner projections (``o`` is mixer_out)
    mixer: list[LinearSite] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "mixer" if self.form == "mixer" else "self" if self.self_attention else "cross"


@dataclass
class FFNBlock:
    up: LinearSite | None = None
    down: LinearSite | None = None
    gate: LinearSite | None = None
    activation: str | None = None
    residual: ResidualSite | None = None
    # mixture of experts (``structure.moe``): up/gate/down above are the shared expert's, if any
    router: LinearSite | None = None
    experts: list[LinearSite] = field(default_factory=list)    # expert_up/expert_gate/expert_down sites
    shared_expert_gate: LinearSite | None = None

    @property
    def moe(self) -> bool:
        return self.router is not None


@dataclass
class Layer:
    index: int                  # global index, 0..N-1 over all stacks in graph order
    stack: int                  # which chain of layers (encoder = 0, decoder = 1 for T5)
    index_in_stack: int
    module_path: str            # common prefix of its sites' module paths (for display)
    attention: AttentionBlock
    cross_attention: AttentionBlock | None = None
    ffn: FFNBlock | None = None

    def linear_sites(self) -> list[LinearSite]:
        out: list[LinearSite] = []
        for blk in (self.attention, self.cross_attention):
            if blk is not None:
                out += [s for s in (blk.q, blk.k, blk.v, blk.o) if s is not None] + list(blk.latent.values())
                out += blk.mixer
        if self.ffn is not None:
            out += [s for s in (self.ffn.up, self.ffn.gate, self.ffn.down) if s is not None]
            out += [s for s in (self.ffn.router, self.ffn.shared_expert_gate) if s is not None]
            out += self.ffn.experts
        return out

    def residual_sites(self) -> dict[str, ResidualSite]:
        """``{"mh": ..., "cross": ..., "output": ...}``; AdapterHub's names for the positions."""
        out: dict[str, ResidualSite] = {}
        if self.attention.residual is not None:
            out["mh"] = self.attention.residual
        if self.cross_attention is not None and self.cross_attention.residual is not None:
            out["cross"] = self.cross_attention.residual
        if self.ffn is not None and self.ffn.residual is not None:
            out["output"] = self.ffn.residual
        return out


@dataclass
class Unmatched:
    """Something recognition looked at and could not place, with the reason."""

    what: str        # e.g. "linear", "attention", "residual"
    where: str       # node name / module path
    reason: str


@dataclass
class Finding:
    """Evidence for one role of one attention candidate: a pattern's ``Match`` or ``MatchFailure``.

    ``core`` is the attention core the role belongs to (for a softmax that did not form an
    attention core, that softmax); ``block`` is ``attention``, ``cross_attention`` or ``ffn``;
    ``role`` one of ``attention q k v o residual ffn up gate down``.
    """

    core: fx.Node
    block: str
    role: str
    result: Any    # structure.patterns.Match | MatchFailure


@dataclass
class StructureMap:
    layers: list[Layer] = field(default_factory=list)
    linear_sites: list[LinearSite] = field(default_factory=list)   # every linear-like site
    unmatched: list[Unmatched] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)                 # "encoder", "decoder", "stack"
    findings: list[Finding] = field(default_factory=list)          # per candidate and role, for why()
    pattern_stats: dict[str, Any] = field(default_factory=dict)     # pattern name → PatternStats
    output_heads: list[str] = field(default_factory=list)           # names of head sites (``structure.heads``)

    def sites_by_name(self) -> dict[str, LinearSite]:
        return {s.name: s for s in self.linear_sites}

    def role_sites(self) -> list[LinearSite]:
        return [s for layer in self.layers for s in layer.linear_sites()]
