"""Recognise Transformer structure from the dataflow graph alone.

before: a captured ATen graph
after:  a :class:`StructureMap` — per layer: attention core, q/k/v/o, FFN up/gate/down,
        residual adds and their norms — plus the reasons for anything left unplaced.

Roles come from dataflow (what feeds the attention core's q/k/v arguments, what
consumes its output, which add closes a sub-block), never from module names.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

from .linear import find_linear_sites
from .norms import PASSTHROUGH, norm_at_output, norm_consuming, strip
from .types import AttentionBlock, FFNBlock, Layer, LinearSite, ResidualSite, StructureMap, Unmatched

aten = torch.ops.aten

# ops a q/k/v tensor flows through between its projection and the attention core
# (head split, RoPE, GQA repeat, scaling) and between the core and the output projection
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.contiguous.default,
    aten.clone.default, aten.flatten.using_ints, aten.unflatten.int, aten.t.default,
    aten.repeat_interleave.self_int, operator.getitem, aten.alias.default,
} | PASSTHROUGH
_QKV_OPS = _SHAPE_OPS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
    aten.sub.Tensor, aten.neg.default, aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.stack.default, aten.chunk.default, aten.index.Tensor, aten.lift_fresh_copy.default,
}
_MASKING = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.where.ScalarOther, aten.where.ScalarSelf,
} | PASSTHROUGH
_BRANCH_TAIL = {aten.dropout.default, aten.mul.Tensor, aten.mul.Scalar, aten.native_dropout.default} | PASSTHROUGH
_ADDS = {aten.add.Tensor, aten.add_.Tensor}  # Falcon sums its parallel branches in place
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
_ACTIVATIONS = {"gelu", "silu", "relu", "tanh", "sigmoid", "gelu_", "relu_", "leaky_relu", "elu",
                "mish", "hardswish", "softplus"}


def _is(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _nodes(args) -> list[fx.Node]:
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _nodes(a)
    return out


class _Recognizer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.sites, self.unmatched = find_linear_sites(gm)
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

    # ---------------------------------------------------------------- tracing helpers
    def trace_back_to_site(self, start: fx.Node, allowed=_QKV_OPS, limit: int = 400) -> LinearSite | None:
        """Nearest linear site upstream of ``start`` through ``allowed`` ops (BFS by depth)."""
        seen, q = {start}, deque([start])
        steps = 0
        while q and steps < limit:
            n = q.popleft()
            steps += 1
            hit = self.by_output.get(n)
            if hit:
                slices = [s for s in hit if s.split_output is n]
                return slices[0] if slices else hit[0]
            if not _is(n, allowed):
                continue
            for a in _nodes(n.args):
                if a not in seen and a.op == "call_function":
                    seen.add(a)
                    q.append(a)
        return None

    def trace_forward_to_site(self, start: fx.Node, allowed=_SHAPE_OPS) -> LinearSite | None:
        seen, q = {start}, deque([start])
        while q:
            n = q.popleft()
            for s in self.by_input_chain.get(n, []):
                return s
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                # the view feeding an addmm is part of that site
                if _is(u, allowed) or any(s.node is u for s in self.sites):
                    if any(s.node is u for s in self.sites):
                        return next(s for s in self.sites if s.node is u)
                    q.append(u)
        return None

    def residual_after(self, out: fx.Node, entry: fx.Node | None = None):
        """From a projection output, follow dropout/scale to the add that closes the sub-block.

        Returns ``(add, branch, stream, sibling)``. In a parallel block (``x + attn(ln x) + mlp(ln x)``)
        the first add joins the two branches; it is recognised by the other operand coming from a
        projection whose own inputs read the same normed ``entry``, and the search goes on to the
        add with the stream.
        """
        frontier, seen, sibling = [out], set(), None
        while frontier:
            n = frontier.pop(0)
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if _is(u, _ADDS) and all(isinstance(a, fx.Node) for a in u.args[:2]):
                    branch_i = 0 if u.args[0] is n else 1
                    other = u.args[1 - branch_i]
                    if sibling is None and entry is not None and self._is_parallel_sibling(other, entry):
                        sibling = other
                        frontier = [u]
                        break
                    return u, u.args[branch_i], other, sibling
                if _is(u, _BRANCH_TAIL):
                    frontier.append(u)
        return None

    def _is_parallel_sibling(self, other: fx.Node, entry: fx.Node) -> bool:
        sib = self.trace_back_to_site(other, allowed=_BRANCH_TAIL | _RESHAPES, limit=10)
        if sib is None:
            return False
        def source(n):  # the stream under a norm (NeoX gives each parallel branch its own LayerNorm)
            ns = norm_at_output(n)
            return strip(ns.input) if ns is not None else strip(n)

        feeding = self._sites_feeding(sib.input, set())
        return any(source(s.input) is source(entry) for s, _ in feeding) or source(sib.input) is source(entry)

    def residual_site(self, out: fx.Node, entry: fx.Node | None) -> ResidualSite | None:
        found = self.residual_after(out, entry)
        if found is None:
            return None
        add, branch, stream, sibling = found
        site = ResidualSite(add=add, branch=branch, stream=stream, parallel_with=sibling)
        self._place_norm(site, entry)
        return site

    def _place_norm(self, site: ResidualSite, entry: fx.Node | None) -> None:
        """Pre-LN if the sub-block's input is a norm of the stream; else post-LN if the
        stream continues only through a norm of the add. (Checked in this order because
        a pre-LN model's last add feeds only the final norm, which looks post-LN locally.)"""
        if entry is not None:
            ns = norm_at_output(entry)
            if ns is not None and strip(ns.input) is strip(site.stream):
                site.norm_before = ns
                return
        norm = norm_consuming(site.add)
        if norm is None:
            return
        users, frontier = [], [site.add]
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if _is(u, PASSTHROUGH):
                    frontier.append(u)
                elif not _is(u, {aten.sym_size.int}):
                    users.append(u)
        if all(u is norm.output or self._inside_norm(u, norm) for u in users):
            site.norm_after = norm

    def _inside_norm(self, node: fx.Node, norm) -> bool:
        # a node between norm.input and norm.output (the decomposed RMSNorm body)
        seen, q = set(), deque([norm.output])
        while q:
            n = q.popleft()
            if n is node:
                return True
            if n is norm.input or n in seen:
                continue
            seen.add(n)
            q.extend(_nodes(n.args))
        return False

    # ---------------------------------------------------------------- attention
    def attention_cores(self) -> list[tuple[fx.Node, str, fx.Node, fx.Node, fx.Node, fx.Node | None]]:
        out = []
        for n in self.gm.graph.nodes:
            if _is(n, {aten.scaled_dot_product_attention.default}):
                out.append((n, "sdpa", n.args[0], n.args[1], n.args[2], None))
            elif _is(n, _SOFTMAX):
                found = self._eager_core(n)
                if found is None:
                    self.unmatched.append(Unmatched(
                        "attention", n.name, "softmax not between two activation matmuls (QKᵀ and ·V)"))
                else:
                    out.append(found)
        return out

    def _eager_core(self, sm: fx.Node):
        # back: softmax ← (mask/bias/scale ops) ← matmul(q, kᵀ)
        n = sm.args[0]
        qk = None
        for _ in range(12):
            if _is(n, _MATMUL) or _is(n, {aten.baddbmm.default}):
                qk = n
                break
            if not _is(n, _MASKING | _RESHAPES):
                return None
            cands = [a for a in _nodes(n.args) if a.op == "call_function"]
            # a direct QKᵀ operand wins (T5 4.57: ``scores += position_bias``, whose bias operand
            # is computed later than the matmul); otherwise follow the most recent operand
            mm = [a for a in cands if _is(a, _MATMUL)]
            n = mm[0] if mm else (max(cands, key=lambda a: self.order[a]) if cands else None)
        if qk is None:
            return None
        # forward: softmax → dropout/cast → matmul(p, v)
        frontier, pv = [sm], None
        for _ in range(6):
            nxt = []
            for f in frontier:
                for u in f.users:
                    if _is(u, _MATMUL) and u.args[0] is f:
                        pv = u
                    elif _is(u, {aten.dropout.default} | PASSTHROUGH | _RESHAPES):
                        nxt.append(u)
            if pv is not None or not nxt:
                break
            frontier = nxt
        if pv is None:
            return None
        q, k = (qk.args[1], qk.args[2]) if qk.target == aten.baddbmm.default else (qk.args[0], qk.args[1])
        return pv, "eager", q, k, pv.args[1], sm

    # ---------------------------------------------------------------- main
    def run(self) -> StructureMap:
        blocks: list[AttentionBlock] = []
        used: set[int] = set()
        for core, form, qn, kn, vn, sm in self.attention_cores():
            q, k, v = (self.trace_back_to_site(x) for x in (qn, kn, vn))
            missing = [r for r, s in (("q", q), ("k", k), ("v", v)) if s is None]
            if missing:
                self.unmatched.append(Unmatched(
                    "attention", core.name,
                    f"no projection found upstream of the core's {'/'.join(missing)} input(s)"))
                continue
            fused = None
            if q is k or k is v or q is v:
                # never give one site two roles: keep the block (o, residual) without q/k/v
                fused = q if q is k or q is v else k
                self.unmatched.append(Unmatched(
                    "attention", core.name,
                    f"q/k/v come from one fused projection ({fused.module_path}) that is not cut into contiguous "
                    "channel ranges (e.g. a head-interleaved layout); adapt it whole by module path"))
                q = k = v = None
            o = self.trace_forward_to_site(core)
            src = fused.input if fused is not None else q.input
            self_attn = fused is not None or (strip(q.input) is strip(k.input) and strip(k.input) is strip(v.input))
            blk = AttentionBlock(core=core, form=form, self_attention=self_attn, q=q, k=k, v=v, o=o,
                                 softmax=sm, fused_qkv=fused)
            if fused is not None:
                used.add(id(fused))
            else:
                self._head_counts(blk, qn)
            if o is None:
                self.unmatched.append(Unmatched("attention", core.name,
                                                "no output projection consumes the attention output"))
            else:
                blk.residual = self.residual_site(o.output, src)
                if blk.residual is None:
                    self.unmatched.append(Unmatched("residual", o.name,
                                                    "output projection does not flow into a residual add"))
            for role, s in (("q", q), ("k", k), ("v", v), ("o", o)):
                if s is not None:
                    s.role = role
                    used.add(id(s))
            blocks.append(blk)

        blocks.sort(key=lambda b: self.order[b.core])
        layers: list[Layer] = []
        for blk in blocks:
            if blk.self_attention or not layers:
                layers.append(Layer(index=len(layers), stack=0, index_in_stack=0, module_path="",
                                    attention=blk))
            else:
                layers[-1].cross_attention = blk

        # feed-forward: the residual add whose stream is the layer's last attention output stream
        for layer in layers:
            last = layer.cross_attention or layer.attention
            if last.residual is None:
                continue
            if last.residual.parallel_with is not None:
                layer.ffn = self._parallel_ffn(last, used)
                if layer.ffn is None:
                    self.unmatched.append(Unmatched("ffn", layer.attention.core.name,
                                                    "parallel block whose feed-forward branch was not recognised"))
                continue
            stream_out = last.residual.norm_after.output if last.residual.norm_after else last.residual.add
            ffn = self._ffn_after(stream_out, used)
            if ffn is None:
                self.unmatched.append(Unmatched("ffn", layer.attention.core.name,
                                                "no feed-forward sub-block follows this attention block"))
            layer.ffn = ffn

        self._assign_stacks(layers)
        for s in self.sites:
            if id(s) not in used:
                self.unmatched.append(Unmatched(
                    "linear", s.name,
                    "not part of a recognised attention or feed-forward block "
                    "(e.g. embeddings projection, pooler, classifier head); select it by module path"))
        for layer in layers:
            for s in layer.linear_sites():
                s.layer = layer.index
                if s.fused:
                    s.name = f"{s.module_path}.{s.role}"
        stacks = self._stack_names(layers)
        return StructureMap(layers=layers, linear_sites=self.sites, unmatched=self.unmatched, stacks=stacks)

    def _head_counts(self, blk: AttentionBlock, qn: fx.Node) -> None:
        val = qn.meta.get("val")
        if val is None or val.dim() != 4:
            return
        heads, head_dim = val.shape[1], val.shape[-1]
        if isinstance(heads, int) and isinstance(head_dim, int) and head_dim > 0:
            blk.num_heads = heads
            if blk.k is not None:
                blk.num_kv_heads = blk.k.out_features // head_dim

    def _ffn_after(self, stream_out: fx.Node, used: set[int]) -> FFNBlock | None:
        # candidate residual adds reachable from stream_out (directly or through value-preserving ops)
        cands = []
        frontier, seen = [stream_out], set()
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if _is(u, {aten.add.Tensor}) and all(isinstance(a, fx.Node) for a in u.args[:2]):
                    cands.append((u, n))
                elif _is(u, PASSTHROUGH | _RESHAPES):
                    frontier.append(u)
        for add, via in sorted(cands, key=lambda c: self.order[c[0]]):
            branch = add.args[1] if add.args[0] is via else add.args[0]
            down = self.trace_back_to_site(branch, allowed=_BRANCH_TAIL | {aten.view.default}, limit=20)
            if down is None or id(down) in used:
                continue
            ins = self._sites_feeding(down.input, used)
            if not ins:
                continue
            residual = ResidualSite(add=add, branch=branch, stream=via)
            self._place_norm(residual, ins[0][0].input)
            return self._ffn_block(down, ins, residual, used)
        return None

    def _ffn_block(self, down: LinearSite, ins, residual: ResidualSite, used: set[int]) -> FFNBlock:
        """up/gate/down roles from the sites feeding ``down``: the one behind an activation is the gate."""
        ffn = FFNBlock(down=down, residual=residual)
        gated = [s for s, act in ins if act]
        plain = [s for s, act in ins if not act]
        if len(ins) >= 2 and gated and plain:
            ffn.gate, ffn.up = gated[0], plain[0]
        else:
            ffn.up = ins[0][0]
        ffn.activation = self._activation(ffn.gate or ffn.up, down)
        for role, s in (("up", ffn.up), ("gate", ffn.gate), ("down", ffn.down)):
            if s is not None:
                s.role = role
                used.add(id(s))
        return ffn

    def _parallel_ffn(self, blk: AttentionBlock, used: set[int]) -> FFNBlock | None:
        r = blk.residual
        down = self.trace_back_to_site(r.parallel_with, allowed=_BRANCH_TAIL | _RESHAPES, limit=10)
        if down is None or id(down) in used:
            return None
        ins = self._sites_feeding(down.input, used)
        return self._ffn_block(down, ins, r, used) if ins else None

    def _sites_feeding(self, node: fx.Node, used: set[int]) -> list[tuple[LinearSite, bool]]:
        """Linear sites upstream of ``node`` before any other projection; flag those behind an activation."""
        out: list[tuple[LinearSite, bool]] = []
        seen = set()
        q = deque([(node, False)])
        while q:
            n, act = q.popleft()
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            hit = self.by_output.get(n)
            if hit:
                s = hit[0]
                if id(s) not in used and all(s is not o for o, _ in out):
                    out.append((s, act))
                continue
            if n.op != "call_function":
                continue
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            is_act = name in _ACTIVATIONS
            if _is(n, {aten.layer_norm.default}) or name in ("rsqrt", "embedding"):
                continue
            for a in _nodes(n.args):
                q.append((a, act or is_act))
            if len(seen) > 200:
                break
        return out

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


def _strip_shape(n):
    """Like ``strip``, also through reshapes: the same stream, flattened or not."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in (PASSTHROUGH | _RESHAPES):
        n = n.args[0]
    return n


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
