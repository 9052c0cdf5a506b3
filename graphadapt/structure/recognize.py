"""Recognise Transformer structure from the dataflow graph alone.

before: a captured ATen graph
after:  a :class:`StructureMap` — per layer: attention core, q/k/v/o, FFN up/gate/down,
        residual adds and their norms — plus the reasons for anything left unplaced.

Roles come from dataflow (what feeds the attention core's q/k/v arguments, what
consumes its output, which add closes a sub-block), never from module names. Each step is
a named pattern of :mod:`.patterns`; the matches and failures that decided a role are kept as
``StructureMap.findings`` for ``structure.explain.why``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque

import torch
import torch.fx as fx

from .heads import output_heads
from .linear import find_linear_sites
from .mla import MLA, whole_latent
from .mixer import TOKEN_MIXER, whole_sites
from .moe import MOE, find_expert_sites, moe_entry
from .ops import ACTIVATIONS as _ACTIVATIONS
from .ops import node_args as _nodes, strip, strip_shape as _strip_shape
from .ops import is_op
from .patterns import (ATTENTION_SINKS, CORE_INDEX, FFN, FFN_GATE, FFN_PARALLEL, K_TRACE, O_TRACE, POST_LN, PRE_LN, Q_TRACE,
                       QKV_DISTINCT, RESIDUAL_ADD, V_TRACE, Matcher)
from .fused_rows import QKV_ROWS
from .types import (AttentionBlock, FFNBlock, Finding, Layer, LinearSite, ResidualSite, StructureMap,
                    Unmatched)

aten = torch.ops.aten
_TRACES = {"q": Q_TRACE, "k": K_TRACE, "v": V_TRACE}


class _Recognizer:
    """Runs the patterns of :mod:`.patterns` over one graph; the context they match in."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.matcher = Matcher()
        self.findings: list[Finding] = []
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.sites, self.unmatched = find_linear_sites(gm, self.matcher)
        self.expert_sites = find_expert_sites(gm, self.matcher)   # mixture of experts (structure.moe)
        self.sites += self.expert_sites
        # node → site(s) whose output (or slice) it is
        self.by_output: dict[fx.Node, list[LinearSite]] = {}
        for s in self.sites:
            key = s.split_output if s.split_output is not None else s.output
            self.by_output.setdefault(key, []).append(s)
            if s.output is not s.node:
                self.by_output.setdefault(s.node, []).append(s)
        self.by_input_chain: dict[fx.Node, list[LinearSite]] = {}
        for s in self.sites:
            self.by_input_chain.setdefault(s.input, []).append(s)
        self.site_of_node: dict[fx.Node, LinearSite] = {}
        self.row_sites: dict[int, tuple] = {}   # id(fused site) → ({role: site with out_rows}, qkv_rows match)
        for s in self.sites:
            self.site_of_node.setdefault(s.node, s)

    def _note(self, core: fx.Node, block: str, role: str, result) -> None:
        self.findings.append(Finding(core, block, role, result))

    def residual_site(self, out: fx.Node, entry: fx.Node | None, core: fx.Node, block: str) -> ResidualSite | None:
        found = self.matcher.run(RESIDUAL_ADD, out, self, entry)
        self._note(core, block, "residual", found)
        if not found:
            return None
        add, branch, stream, sibling = found.value
        site = ResidualSite(add=add, branch=branch, stream=stream, parallel_with=sibling)
        self._place_norm(site, entry, core, block)
        return site

    def _place_norm(self, site: ResidualSite, entry: fx.Node | None, core: fx.Node, block: str) -> None:
        """Pre-LN if the sub-block's input is a norm of the stream; else post-LN if the
        stream continues only through a norm of the add. (Checked in this order because
        a pre-LN model's last add feeds only the final norm, which looks post-LN locally.)"""
        pre = self.matcher.run(PRE_LN, site, entry, self.matcher)
        self._note(core, block, "residual", pre)
        if pre:
            site.norm_before = pre.value
            return
        post = self.matcher.run(POST_LN, site, self.matcher)
        self._note(core, block, "residual", post)
        if post:
            site.norm_after = post.value

    # ---------------------------------------------------------------- attention
    def attention_cores(self) -> list:
        out = []
        for n in self.gm.graph.nodes:
            r = self.matcher.first(CORE_INDEX, n, self.order)
            if r is None:
                continue
            if r:
                out.append(r)
            elif any(u.target is aten.topk.default for u in n.users) or _after_topk(n):
                continue   # a mixture-of-experts router's softmax (structure.moe), not an attention candidate
            else:
                self._note(n, "attention", "attention", r)
                self.unmatched.append(Unmatched(
                    "attention", n.name, "softmax not between two activation matmuls (QKᵀ and ·V)"))
        return out

    # ---------------------------------------------------------------- main
    def run(self) -> StructureMap:
        blocks: list[AttentionBlock] = []
        used: set[int] = set()
        for found in self.attention_cores():
            core, form, qn, kn, vn, sm = found.value
            self._note(core, "attention", "attention", found)
            for n in found.via:   # the evidence for attention sinks the core was found through
                if is_op(n, {aten.cat.default}):
                    self._note(core, "attention", "attention", self.matcher.run(ATTENTION_SINKS, n))
            traced = {}
            for role, x in (("q", qn), ("k", kn), ("v", vn)):
                traced[role] = self.matcher.run(_TRACES[role], x, self)
                self._note(core, "attention", role, traced[role])
            q, k, v = (traced[r].value if traced[r] else None for r in "qkv")
            missing = [r for r, s in (("q", q), ("k", k), ("v", v)) if s is None]
            if missing:
                self.unmatched.append(Unmatched(
                    "attention", core.name,
                    f"no projection found upstream of the core's {'/'.join(missing)} input(s)"))
                continue
            fused, latent, src = None, {}, None
            mla = self.matcher.run(MLA, core, q, k, self) if k is v else None
            if mla is not None:
                for role in "qkv":
                    self._note(core, "attention", role, mla)
            if mla:     # multi-head latent attention: q_a/q_b (or q), kv_a, kv_b instead of q/k/v
                latent, src = dict(mla.value[0]), mla.value[1]
                latent["kv_a"] = whole_latent(latent["kv_a"], self.sites)
                q, k, v = latent.pop("q", None), None, None
                distinct = mla
            else:
                distinct = self.matcher.run(QKV_DISTINCT, core, q, k, v)
            if not distinct:
                q, k, v, distinct = self._fused_rows(core, {"q": (q, qn), "k": (k, kn), "v": (v, vn)}, distinct)
            if not distinct:
                # never give one site two roles: keep the block (o, residual) without q/k/v
                fused = q if q is k or q is v else k
                for role in "qkv":
                    self._note(core, "attention", role, distinct)
                self.unmatched.append(Unmatched(
                    "attention", core.name,
                    f"q/k/v come from one fused projection ({fused.module_path}) that is not cut into contiguous "
                    "channel ranges, nor into per-role channel sets by data-movement ops "
                    f"({distinct.reason}); adapt it whole by module path"))
                q = k = v = None
            o_found = self.matcher.run(O_TRACE, core, self)
            self._note(core, "attention", "o", o_found)
            o = o_found.value if o_found else None
            if src is None:
                src = fused.input if fused is not None else q.input
            self_attn = fused is not None or bool(latent) or (
                strip(q.input) is strip(k.input) and strip(k.input) is strip(v.input))
            blk = AttentionBlock(core=core, form=form, self_attention=self_attn, q=q, k=k, v=v, o=o,
                                 softmax=sm, fused_qkv=fused, latent=latent)
            if fused is not None:
                used.add(id(fused))
            elif latent:
                val = qn.meta.get("val")
                if val is not None and val.dim() == 4 and isinstance(val.shape[1], int):
                    blk.num_heads = blk.num_kv_heads = val.shape[1]   # the latent is expanded per head
            else:
                self._head_counts(blk, qn)
            if o is None:
                self.unmatched.append(Unmatched("attention", core.name,
                                                "no output projection consumes the attention output"))
            else:
                blk.residual = self.residual_site(o.output, src, core, "attention")
                if blk.residual is None:
                    self.unmatched.append(Unmatched("residual", o.name,
                                                    "output projection does not flow into a residual add"))
            for role, s in (("q", q), ("k", k), ("v", v), ("o", o), *latent.items()):
                if s is not None:
                    s.role = role
                    used.add(id(s))
            blocks.append(blk)

        blocks += self._mixers(used)
        blocks.sort(key=lambda b: self.order[b.core])
        layers: list[Layer] = []
        for blk in blocks:
            if blk.self_attention or not layers:
                layers.append(Layer(index=len(layers), stack=0, index_in_stack=0, module_path="",
                                    attention=blk))
            else:
                layers[-1].cross_attention = blk
                for f in self.findings:
                    if f.core is blk.core:
                        f.block = "cross_attention"

        # feed-forward: the residual add whose stream is the layer's last attention output stream
        for layer in layers:
            last = layer.cross_attention or layer.attention
            core = layer.attention.core
            if last.residual is None:
                self._note(core, "ffn", "ffn", FFN.fail(
                    last.core, "the attention block has no residual add, so there is no stream to follow"))
                continue
            if last.residual.parallel_with is not None:
                layer.ffn = self._parallel_ffn(last, used, core)
                if layer.ffn is None:
                    self.unmatched.append(Unmatched("ffn", layer.attention.core.name,
                                                    "parallel block whose feed-forward branch was not recognised"))
                continue
            stream_out = last.residual.norm_after.output if last.residual.norm_after else last.residual.add
            ffn = self._moe_after(stream_out, used, core) if self.expert_sites else None
            if ffn is None:
                ffn = self._ffn_after(stream_out, used, core)
            if ffn is None:
                self.unmatched.append(Unmatched("ffn", layer.attention.core.name,
                                                "no feed-forward sub-block follows this attention block"))
            layer.ffn = ffn

        self._assign_stacks(layers)
        heads = {id(m.value): m for m in output_heads([s for s in self.sites if id(s) not in used], self.matcher)}
        for s in self.sites:
            if id(s) in heads:
                self.unmatched.append(Unmatched(
                    "linear", s.name, "the output head (pattern output_head: its output is a model output): left "
                    "out of 'all-linear' as PEFT does; select it by module path or train it via modules_to_save"))
            elif id(s) not in used:
                self.unmatched.append(Unmatched(
                    "linear", s.name,
                    "not part of a recognised attention or feed-forward block "
                    "(e.g. embeddings projection, pooler); 'all-linear' adapts it, or select it by module path"))
        for layer in layers:
            for s in layer.linear_sites():
                s.layer = layer.index
                if s.fused:
                    s.name = f"{s.module_path}.{s.role}"
        stacks = self._stack_names(layers)
        return StructureMap(layers=layers, linear_sites=self.sites, unmatched=self.unmatched, stacks=stacks,
                            findings=self.findings, pattern_stats=self.matcher.stats,
                            output_heads=[m.value.name for m in heads.values()])

    def _mixers(self, used: set[int]) -> list[AttentionBlock]:
        """Token mixers without softmax (:mod:`.mixer`): each unused projection closing a residual add over a
        body that mixes positions becomes a block of form ``"mixer"`` that starts a layer."""
        out = []
        experts = {id(s) for s in self.expert_sites}
        for s in sorted(self.sites, key=lambda x: -self.order[x.node]):   # last first: inner mixers claim late
            if id(s) in used or id(s) in experts or s.fused:
                continue
            found = self.matcher.run(TOKEN_MIXER, s, self, used)
            if not found:
                continue
            ins, inner, add, branch, stream, entry = found.value
            ins, inner = whole_sites(ins, self.sites), whole_sites(inner, self.sites)
            core = s.input
            blk = AttentionBlock(core=core, form="mixer", self_attention=True, o=s, mixer=ins + inner)
            for role in ("attention", "mixer_in", "mixer_inner", "mixer_out"):
                self._note(core, "attention", role, found)
            blk.residual = ResidualSite(add=add, branch=branch, stream=stream)
            self._place_norm(blk.residual, entry, core, "attention")
            s.role = "mixer_out"
            for role, group in (("mixer_in", ins), ("mixer_inner", inner)):
                for x in group:
                    x.role = role
            for x in [s, *ins, *inner]:
                used.add(id(x))
            out.append(blk)
        return out

    def _fused_rows(self, core: fx.Node, traced: dict, distinct):
        """q/k/v sharing one site: per-role channel index sets (pattern ``qkv_rows``), one new site per
        role in place of the fused one. Returns ``(q, k, v, result)``; ``result`` is falsy when not cut."""
        sites = [s for s, _ in traced.values()]
        fused = next(s for s in sites if sum(o is s for o in sites) > 1)
        roles = {r: x for r, (s, x) in traced.items() if s is fused}
        cache = self.row_sites
        if id(fused) not in cache:
            found = self.matcher.run(QKV_ROWS, core, fused, roles, self)
            for r in roles:
                self._note(core, "attention", r, found)
            if not found:
                return (*(s for s, _ in traced.values()), found)
            total = fused.total_out or fused.out_features
            parts = {r: dataclasses.replace(fused, name=f"{fused.name}.{r}", out_features=len(idx), out_slice=None,
                                            total_out=total, split_output=None, out_rows=idx, role=None)
                     for r, idx in found.value.items()}
            i = next(j for j, s in enumerate(self.sites) if s is fused)
            self.sites[i:i + 1] = list(parts.values())
            cache[id(fused)] = (parts, found)
        parts, found = cache[id(fused)]
        if set(parts) != set(roles):
            return (*(s for s, _ in traced.values()), QKV_ROWS.fail(
                core, "the roles reading this fused projection differ from those at its first use"))
        out = [parts.get(r, s) for r, (s, _) in traced.items()]
        return (*out, QKV_DISTINCT.ok(core, tuple(out)))

    def _head_counts(self, blk: AttentionBlock, qn: fx.Node) -> None:
        val = qn.meta.get("val")
        if val is None or val.dim() != 4:
            return
        heads, head_dim = val.shape[1], val.shape[-1]
        if isinstance(heads, int) and isinstance(head_dim, int) and head_dim > 0:
            blk.num_heads = heads
            if blk.k is not None:
                blk.num_kv_heads = blk.k.out_features // head_dim

    def _ffn_after(self, stream_out: fx.Node, used: set[int], core: fx.Node) -> FFNBlock | None:
        found = self.matcher.run(FFN, stream_out, self, used)
        self._note(core, "ffn", "ffn", found)
        if not found:
            return None
        down, ins, residual = found.value
        self._place_norm(residual, ins[0][0].input, core, "ffn")
        return self._ffn_block(down, ins, residual, used, core)

    def _moe_after(self, stream_out: fx.Node, used: set[int], core: fx.Node) -> FFNBlock | None:
        """A mixture-of-experts block after the attention block (:mod:`.moe`): router, experts, shared expert."""
        found = self.matcher.run(MOE, stream_out, self, used, self.expert_sites)
        self._note(core, "ffn", "ffn", found)
        if not found:
            return None
        blk = found.value
        self._place_norm(blk.residual, moe_entry(blk), core, "ffn")
        blk.router.role = "router"
        if blk.shared_expert_gate is not None:
            blk.shared_expert_gate.role = "shared_expert_gate"
        for role, s in (("up", blk.up), ("gate", blk.gate), ("down", blk.down)):
            if s is not None:
                s.role = role
        if blk.down is not None:
            blk.activation = self._activation(blk.gate or blk.up, blk.down)
        for s in [blk.router, blk.shared_expert_gate, blk.up, blk.gate, blk.down, *blk.experts]:
            if s is not None:
                used.add(id(s))
        return blk

    def _ffn_block(self, down: LinearSite, ins, residual: ResidualSite, used: set[int],
                   core: fx.Node) -> FFNBlock:
        """up/gate/down roles from the sites feeding ``down``: the one behind an activation is the gate."""
        ffn = FFNBlock(down=down, residual=residual)
        gate = self.matcher.run(FFN_GATE, down, ins)
        self._note(core, "ffn", "gate", gate)
        if gate:
            ffn.gate, ffn.up = gate.value
        else:
            ffn.up = ins[0][0]
        ffn.activation = self._activation(ffn.gate or ffn.up, down)
        for role, s in (("up", ffn.up), ("gate", ffn.gate), ("down", ffn.down)):
            if s is not None:
                s.role = role
                used.add(id(s))
        return ffn

    def _parallel_ffn(self, blk: AttentionBlock, used: set[int], core: fx.Node) -> FFNBlock | None:
        found = self.matcher.run(FFN_PARALLEL, blk.residual, self, used)
        self._note(core, "ffn", "ffn", found)
        if not found:
            return None
        down, ins, r = found.value
        return self._ffn_block(down, ins, r, used, core)

    def _activation(self, up: LinearSite, down: LinearSite) -> str | None:
        seen, q = set(), deque([down.input])
        names = []
        while q:
            n = q.popleft()
            if n in seen or not isinstance(n, fx.Node) or n is up.output or n.op != "call_function":
                continue
            seen.add(n)
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if name in _ACTIVATIONS:
                names.append(name)
            stack = n.meta.get("nn_module_stack") or {}
            if stack and name in ("tanh", "mul", "pow", "add") and not names:
                typ = list(stack.values())[-1][1]
                tname = getattr(typ, "__name__", str(typ)).rsplit(".", 1)[-1].strip("'>")
                if "act" in list(stack.values())[-1][0].rsplit(".", 1)[-1].lower():
                    names.append(tname)
            q.extend(_nodes(n.args))
            if len(seen) > 60:
                break
        return names[0] if names else None

    def _assign_stacks(self, layers: list[Layer]) -> None:
        prev_out = None
        stack, idx = -1, 0
        for layer in layers:
            r = layer.attention.residual
            entry = _strip_shape(r.stream) if r is not None else None
            if prev_out is None or entry is not prev_out:
                stack += 1
                idx = 0
            layer.stack, layer.index_in_stack = stack, idx
            idx += 1
            last = layer.ffn.residual if layer.ffn and layer.ffn.residual else (
                (layer.cross_attention or layer.attention).residual)
            if last is None:
                prev_out = None
            else:
                prev_out = _strip_shape(last.norm_after.output if last.norm_after else last.add)
            paths = [s.module_path for s in layer.linear_sites() if s.module_path]
            layer.module_path = _common_prefix(paths)

    def _stack_names(self, layers: list[Layer]) -> list[str]:
        n = max((l.stack for l in layers), default=-1) + 1
        names = []
        for i in range(n):
            paths = [l.module_path for l in layers if l.stack == i]
            common = _common_prefix(paths)
            names.append(common or f"stack{i}")
        return names


def _after_topk(n: fx.Node) -> bool:
    """A softmax over the values a ``topk`` picked (a router normalising its top-k logits)."""
    x = strip(n.args[0]) if n.args else None
    return isinstance(x, fx.Node) and x.target is operator.getitem and is_op(x.args[0], {aten.topk.default})


def _common_prefix(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    out = []
    for seg in zip(*parts):
        if all(s == seg[0] for s in seg):
            out.append(seg[0])
        else:
            break
    return ".".join(out)


def recognize(gm: fx.GraphModule) -> StructureMap:
    """Build the :class:`StructureMap` of a captured graph."""
    return _Recognizer(gm).run()
