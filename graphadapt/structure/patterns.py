"""Recognition patterns as declarations.

Each :class:`Pattern` has a ``name``, the ops it is indexed by (``ops``; empty when the
recogniser starts it from a node it already holds, as for the traces), a one-line ``what``,
and ``match(node, ...)``, which returns a :class:`Match` (truthy, with the recognised value)
or a :class:`MatchFailure` (falsy) carrying the node where the pattern gave up, the pattern's
name and the reason. A :class:`Matcher` runs patterns and counts, per pattern, how often it
was tried and how often it matched; the recogniser keeps the failures it acted on, so
``structure.explain.why`` can say which node and which pattern stopped a role from being found.

Catalogue (``PATTERNS``):

- linear forms: ``linear`` (``aten.linear``), ``addmm`` (GPT-2 ``view → addmm → view``), ``mm``,
  ``matmul_param`` (``x @ W.T``), ``fused_split`` (a projection cut by split/chunk/slice);
- attention cores: ``sdpa``, ``eager_attention``
  (``matmul → mask/scale → softmax → dropout → matmul``), ``qkv_distinct``;
- norms: ``layer_norm``, ``rms_norm``, ``rms_norm_decomposed``;
- traces: ``q_trace``/``k_trace``/``v_trace`` (upstream from the core to a linear site),
  ``o_trace`` (downstream), ``branch_trace``, ``down_trace``;
- residual points: ``residual_add``, ``parallel_sibling``, ``pre_ln``, ``post_ln``;
- feed-forward: ``ffn``, ``ffn_parallel``, ``ffn_gate``.

Patterns that follow dataflow take a context ``ctx`` (the recogniser) with ``matcher``, ``order``
(node → position), ``by_output`` (node → linear sites whose output it is), ``by_input_chain``
(node → sites reading it) and ``site_of_node`` (the site's own ATen node → site).
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..quantized import linear_4bit
from .ops import (ACTIVATIONS, ADDS, BRANCH_TAIL, MASKING, MATMUL, PASSTHROUGH, QKV_OPS, RESHAPES, SHAPE_OPS, SOFTMAX,
                  SPLITS, TRANSPOSES, VIEWS, is_op, module_path, node_args, op_name, strip)
from .types import LinearSite, NormSite, ResidualSite

aten = torch.ops.aten


# --------------------------------------------------------------------------- framework
def describe(n) -> str:
    """``name (aten.op.overload)`` for a node, for messages."""
    if not isinstance(n, fx.Node):
        return repr(n)
    return f"{n.name} ({op_name(n)})"


@dataclass(frozen=True, eq=False)
class Match:
    """A pattern matched: ``node`` is where (the anchor), ``value`` what it recognised,
    ``via`` the nodes a trace went through (start first)."""

    pattern: str
    node: fx.Node | None
    value: Any = None
    via: tuple = ()

    def __bool__(self) -> bool:
        return True

    def describe(self) -> str:
        return f"pattern {self.pattern} matched at {describe(self.node)}"


@dataclass(frozen=True, eq=False)
class MatchFailure:
    """A pattern rejected ``node`` for ``reason``; ``via`` are the nodes visited before it."""

    pattern: str
    node: fx.Node | None
    reason: str
    via: tuple = ()

    def __bool__(self) -> bool:
        return False

    def describe(self) -> str:
        at = f" at {describe(self.node)}" if self.node is not None else ""
        return f"pattern {self.pattern} rejected{at}: {self.reason}"

    __str__ = describe


@dataclass(eq=False)
class Pattern:
    """A named recognition pattern; ``fn(pattern, node, *args)`` does the matching."""

    name: str
    ops: frozenset
    what: str
    fn: Callable = field(repr=False)

    def match(self, node, *args, **kwargs) -> Match | MatchFailure:
        return self.fn(self, node, *args, **kwargs)

    def ok(self, node, value=None, via=()) -> Match:
        return Match(self.name, node, value, tuple(via))

    def fail(self, node, reason: str, via=()) -> MatchFailure:
        return MatchFailure(self.name, node, reason, tuple(via))


@dataclass(eq=False)
class Trace(Pattern):
    """A breadth-first walk through ``allowed`` ops to the nearest linear site."""

    allowed: frozenset = frozenset()
    through: str = ""       # what ``allowed`` is, in words
    limit: int = 0          # upstream traces: most nodes visited
    gates: bool = False     # downstream traces: also through a sigmoid output gate ``x * sigmoid(g)``


@dataclass
class PatternStats:
    tried: int = 0
    matched: int = 0


def index(patterns) -> dict:
    """``{op: [patterns indexed by it, in declaration order]}``."""
    out: dict = {}
    for p in patterns:
        for op in p.ops:
            out.setdefault(op, []).append(p)
    return out


class Matcher:
    """Runs patterns and counts tried/matched per pattern name (one per recognition run)."""

    def __init__(self):
        self.stats: dict[str, PatternStats] = {}

    def run(self, pattern: Pattern, node, *args, **kwargs) -> Match | MatchFailure:
        st = self.stats.setdefault(pattern.name, PatternStats())
        st.tried += 1
        r = pattern.match(node, *args, **kwargs)
        if r:
            st.matched += 1
        return r

    def first(self, idx: dict, node, *args, **kwargs) -> Match | MatchFailure | None:
        """The first match among the patterns ``idx`` lists for ``node``'s op, else the last failure;
        ``None`` when no pattern is indexed by that op."""
        target = node.target if isinstance(node, fx.Node) and node.op == "call_function" else None
        last = None
        for p in idx.get(target, ()) if target is not None else ():
            r = self.run(p, node, *args, **kwargs)
            if r:
                return r
            last = r
        return last


def _path_to(parent: dict, n) -> list:
    path = []
    while n is not None:
        path.append(n)
        n = parent.get(n)
    return path[::-1]


# --------------------------------------------------------------------------- linear forms
def _param(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            t = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target, t
    return None


def _owner(qualname: str) -> str:
    return qualname.rsplit(".", 1)[0] if "." in qualname else ""


def _linear(p: Pattern, n: fx.Node, gm) -> Match | MatchFailure:
    x, w = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    # ``F.linear(x, W.float())`` (an fp32 router): the cast is a no-op at capture; the site is W's
    w, b = strip(w), strip(b)
    pw = _param(gm, w)
    if pw is None or pw[1].dim() != 2:
        return p.fail(n, "weight is not a 2-d parameter of the model")
    pb = _param(gm, b) if b is not None else None
    name, wt = pw
    return p.ok(n, LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=n,
                              weight=name, bias=pb[0] if pb else None, in_features=wt.shape[1],
                              out_features=wt.shape[0], layout="linear", total_out=wt.shape[0], pattern=p.name))


def _mm(p: Pattern, n: fx.Node, gm) -> Match | MatchFailure:
    if n.target == aten.addmm.default:
        b, x2, w = n.args[0], n.args[1], n.args[2]
    else:
        b, (x2, w) = None, n.args[:2]
    pw = _param(gm, w)
    layout = "conv1d"
    if pw is None and isinstance(w, fx.Node) and w.target == aten.t.default:
        pw, layout = _param(gm, w.args[0]), "linear"
    if pw is None or pw[1].dim() != 2:
        return p.fail(n, "the second operand is not a 2-d parameter (nor its transpose): "
                         "a product of two activations, not a projection")
    pb = _param(gm, b) if b is not None else None
    name, wt = pw
    inf, outf = (wt.shape[0], wt.shape[1]) if layout == "conv1d" else (wt.shape[1], wt.shape[0])
    x = x2.args[0] if isinstance(x2, fx.Node) and x2.target in VIEWS else x2
    users = list(n.users)
    out = users[0] if len(users) == 1 and users[0].target in VIEWS else n
    return p.ok(n, LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=out,
                              weight=name, bias=pb[0] if pb else None, in_features=inf,
                              out_features=outf, layout=layout, total_out=outf, pattern=p.name))


def _matmul_param(p: Pattern, n: fx.Node, gm) -> Match | MatchFailure:
    # ``x @ W.T`` written by hand (Falcon's FalconLinear): matmul with a (transposed) parameter
    x, w = n.args[0], n.args[1]
    layout = "conv1d"
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target in TRANSPOSES:
        w, layout = w.args[0], "linear"
    pw = _param(gm, w)
    if pw is None or pw[1].dim() != 2:
        return p.fail(n, "the second operand is not a 2-d parameter (nor its transpose): "
                         "activation @ activation (e.g. attention scores), not a projection")
    name, wt = pw
    inf, outf = (wt.shape[0], wt.shape[1]) if layout == "conv1d" else (wt.shape[1], wt.shape[0])
    return p.ok(n, LinearSite(name=_owner(name), module_path=_owner(name), node=n, input=x, output=n,
                              weight=name, bias=None, in_features=inf, out_features=outf, layout=layout,
                              total_out=outf, pattern=p.name))


def _last_dim(dim, rank) -> bool:
    return rank is not None and dim in (-1, rank - 1)


def _fused_split(p: Pattern, out: fx.Node, width: int) -> Match | MatchFailure:
    """``value``: [(start, end, node)] per piece of ``out``'s channels, when there are several.

    Forms: ``split``/``split_with_sizes``/``chunk`` on the last dim followed by ``getitem``
    (GPT-2 ``c_attn``, Phi-3 ``gate_up_proj``), or several ``slice`` users on the last dim
    (Phi-3 ``qkv_proj``). Anything else (e.g. a head-interleaved view then split, as in
    GPT-NeoX) is not a contiguous channel split.
    """
    users = list(out.users)
    rank = len(out.meta["val"].shape) if "val" in out.meta else None
    if not users or rank is None:
        return p.fail(out, "the projection output has no users" if not users else "no shape recorded")
    if all(u.op == "call_function" and u.target == aten.slice.Tensor for u in users):
        pieces = []
        for u in users:
            dim, start, end = (list(u.args[1:4]) + [0, None, None])[:3] if len(u.args) > 1 else (0, None, None)
            step = u.args[4] if len(u.args) > 4 else 1
            if not _last_dim(dim, rank) or step != 1 or not isinstance(start or 0, int) \
                    or not isinstance(end if end is not None else width, int):
                return p.fail(u, "not a unit-step slice of the last dim with constant bounds")
            start = max(0, start or 0)
            end = width if end is None else min(end, width)
            pieces.append((start, end, u))
        pieces.sort(key=lambda q: q[0])
        return p.ok(out, pieces) if len(pieces) > 1 else p.fail(out, "a single slice, not a fused projection")
    if len(users) != 1 or users[0].op != "call_function":
        return p.fail(out, f"the output has {len(users)} users, not one split/chunk or only slices")
    u = users[0]
    if u.target in SPLITS:
        dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
        if not _last_dim(dim, rank):
            return p.fail(u, f"split on dim {dim}, not the channel (last) dim")
        if u.target == aten.split.Tensor:
            size = u.args[1]
            sizes = [min(size, width - i) for i in range(0, width, size)]
        elif u.target == aten.chunk.default:
            n = u.args[1]
            size = -(-width // n)
            sizes = [min(size, width - i) for i in range(0, width, size)]
        else:
            sizes = list(u.args[1])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        got = {}
        for g in u.users:
            if g.op == "call_function" and g.target is operator.getitem:
                got[g.args[1]] = g
        if not got:
            return p.fail(u, "no piece of the split is used")
        pieces = [(starts[i], starts[i] + sizes[i], got[i]) for i in sorted(got)]
        return p.ok(out, pieces) if len(pieces) > 1 else p.fail(u, "only one piece of the split is used")
    return p.fail(u, "the output's one user is not split/chunk/slice (not a fused projection)")


LINEAR = Pattern("linear", frozenset({aten.linear.default, linear_4bit}),
                 "aten.linear(x, W[out,in], b) (or a packed 4-bit base's linear_4bit(x, W, b, packed))", _linear)
ADDMM = Pattern("addmm", frozenset({aten.addmm.default}),
                "view(x,[-1,in]) → addmm(b, ·, W[in,out] or t(W)) → view (GPT-2 Conv1D)", _mm)
MM = Pattern("mm", frozenset({aten.mm.default}), "mm(x, W[in,out] or t(W)), no bias", _mm)
MATMUL_PARAM = Pattern("matmul_param", frozenset({aten.matmul.default}), "x @ W or x @ W.T (Falcon)",
                       _matmul_param)
FUSED_SPLIT = Pattern("fused_split", frozenset(SPLITS | {aten.slice.Tensor}),
                      "a projection's output channels cut by split/chunk/slice: one site per piece", _fused_split)
LINEAR_FORMS = (LINEAR, ADDMM, MM, MATMUL_PARAM)
LINEAR_INDEX = index(LINEAR_FORMS)


# --------------------------------------------------------------------------- norms
def _attr(n) -> str | None:
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _weight_of(n) -> tuple[str, float] | None:
    """A norm's scale operand: a parameter, maybe cast, maybe offset (Gemma's ``1 + w``)."""
    n = strip(n)
    if _attr(n) is not None:
        return n.target, 0.0
    if is_op(n, {aten.add.Tensor, aten.add.Scalar}) and isinstance(n.args[1], (int, float)):
        base = strip(n.args[0])
        if _attr(base) is not None:
            return base.target, float(n.args[1])
    return None


def _layer_norm(p: Pattern, outer: fx.Node) -> Match | MatchFailure:
    node = strip(outer)
    if not is_op(node, {aten.layer_norm.default}):
        return p.fail(node, "not aten.layer_norm")
    a = node.args
    eps = a[4] if len(a) > 4 else 1e-5
    return p.ok(node, NormSite("layer_norm", a[0], node, _attr(a[2]) if len(a) > 2 else None,
                               _attr(a[3]) if len(a) > 3 else None, float(eps), module_path(outer)))


def _rms_norm(p: Pattern, outer: fx.Node) -> Match | MatchFailure:
    node = strip(outer)
    if not is_op(node, {aten.rms_norm.default}):
        return p.fail(node, "not aten.rms_norm")
    a = node.args
    w = _attr(a[2]) if len(a) > 2 else None
    eps = a[3] if len(a) > 3 and a[3] is not None else 1e-6
    return p.ok(node, NormSite("rms_norm", a[0], node, w, None, float(eps), module_path(outer)))


def _rms_norm_decomposed(p: Pattern, outer: fx.Node) -> Match | MatchFailure:
    """``[to] → pow(·,2) → mean(-1, keepdim) → add(eps) → rsqrt → mul(x, ·) → [to] → mul(w, ·)``."""
    node = strip(outer)
    weight, offset = None, 0.0
    inner = node
    if is_op(node, {aten.mul.Tensor}):
        for i, other in ((0, 1), (1, 0)):
            w = _weight_of(node.args[i]) if isinstance(node.args[i], fx.Node) else None
            if w is not None and isinstance(node.args[other], fx.Node):
                (weight, offset), inner = w, node.args[other]
                break
    inner = strip(inner)
    if not is_op(inner, {aten.mul.Tensor}):
        return p.fail(inner, "the normalised value is not mul(x, rsqrt(...))")
    x, r = inner.args
    if is_op(x, {aten.rsqrt.default}):
        x, r = r, x
    if not is_op(r, {aten.rsqrt.default}):
        return p.fail(inner, "neither factor of the mul is an rsqrt")
    add = r.args[0]
    if not is_op(add, {aten.add.Tensor, aten.add.Scalar}) or not isinstance(add.args[1], (int, float)):
        return p.fail(r, "rsqrt's input is not add(·, eps)")
    mean = add.args[0]
    if not is_op(mean, {aten.mean.dim}):
        return p.fail(add, "add(·, eps) does not read a mean")
    pw = mean.args[0]
    if not is_op(pw, {aten.pow.Tensor_Scalar}) or pw.args[1] != 2:
        return p.fail(mean, "the mean is not of pow(x, 2)")
    if strip(pw.args[0]) is not strip(x):
        return p.fail(pw, "pow(x, 2) and mul(x, rsqrt) read different x")
    return p.ok(outer, NormSite("rms_norm", x, outer, weight, None, float(add.args[1]), module_path(outer),
                                weight_offset=offset))


LAYER_NORM = Pattern("layer_norm", frozenset({aten.layer_norm.default}), "aten.layer_norm(x, shape, w, b, eps)",
                     _layer_norm)
RMS_NORM = Pattern("rms_norm", frozenset({aten.rms_norm.default}), "aten.rms_norm(x, shape, w, eps)", _rms_norm)
RMS_NORM_DECOMPOSED = Pattern(
    "rms_norm_decomposed", frozenset({aten.mul.Tensor}),
    "pow(x,2) → mean → add(eps) → rsqrt → mul(x, ·) → [to] → mul(w or 1+w, ·)", _rms_norm_decomposed)
NORMS = (LAYER_NORM, RMS_NORM, RMS_NORM_DECOMPOSED)
NORM_INDEX = index(NORMS)   # keyed by the op of the norm output after value-preserving casts


def norm_match(node, matcher: Matcher | None = None) -> Match | MatchFailure:
    """Is ``node`` the output of a norm? (Indexed by its op after stripping casts.)"""
    m = matcher or Matcher()
    inner = strip(node)
    target = inner.target if isinstance(inner, fx.Node) and inner.op == "call_function" else None
    last = None
    for p in NORM_INDEX.get(target, ()) if target is not None else ():
        r = m.run(p, node)
        if r:
            return r
        last = r
    return last if last is not None else MatchFailure("norm", inner if isinstance(inner, fx.Node) else None,
                                "not a norm output (layer_norm, rms_norm, or RMSNorm's final mul)")


# --------------------------------------------------------------------------- attention cores
def _sdpa(p: Pattern, n: fx.Node, order=None) -> Match | MatchFailure:
    return p.ok(n, (n, "sdpa", n.args[0], n.args[1], n.args[2], None))


def _eager_attention(p: Pattern, sm: fx.Node, order: dict) -> Match | MatchFailure:
    # back: softmax ← (mask/bias/scale ops) ← matmul(q, kᵀ)
    n = sm.args[0]
    qk = None
    via = [sm]
    for _ in range(12):
        if is_op(n, MATMUL) or is_op(n, {aten.baddbmm.default}):
            qk = n
            break
        if not is_op(n, MASKING | RESHAPES | {aten.cat.default}):
            if n is None:
                return p.fail(sm, "the mask/scale chain above the softmax ends without a QKᵀ matmul", via)
            return p.fail(n, "above the softmax: neither a mask/scale/bias/reshape op nor the QKᵀ matmul", via)
        via.append(n)
        cands = [a for a in node_args(n.args) if a.op == "call_function"]
        if is_op(n, {aten.masked_fill.Scalar, aten.masked_fill.Tensor}) and isinstance(n.args[0], fx.Node):
            cands = [n.args[0]]   # the scores being filled, not the (later-computed) mask (DeBERTa-v2)
        elif is_op(n, {aten.sub.Tensor}) and _row_max_of(n.args[1], n.args[0]):
            cands = [n.args[0]]   # ``x - max(x)``: the softmax's stabilisation, not another operand
        elif is_op(n, {aten.cat.default}):
            sink = ATTENTION_SINKS.match(n)
            if not sink:
                return p.fail(n, f"above the softmax: a cat that is not attention sinks ({sink.reason})", via)
            cands = [sink.value[0]]
        # a direct QKᵀ operand wins (T5 4.57: ``scores += position_bias``, whose bias operand
        # is computed later than the matmul); otherwise follow the most recent operand
        mm = [a for a in cands if is_op(a, MATMUL)]
        n = mm[0] if mm else (max(cands, key=lambda a: order[a]) if cands else None)
    if qk is None:
        return p.fail(sm, "no QKᵀ matmul within 12 mask/scale ops above the softmax", via)
    # forward: softmax → dropout/cast → matmul(p, v)
    frontier, pv = [sm], None
    for _ in range(6):
        nxt = []
        for f in frontier:
            for u in f.users:
                if is_op(u, MATMUL) and u.args[0] is f:
                    pv = u
                elif is_op(u, {aten.dropout.default} | PASSTHROUGH | RESHAPES) or _drops_sinks(u):
                    nxt.append(u)
        if pv is not None or not nxt:
            break
        frontier = nxt
    if pv is None:
        return p.fail(sm, "no matmul(·, V) reads the softmax output through dropout/cast/reshape ops", via)
    q, k = (qk.args[1], qk.args[2]) if qk.target == aten.baddbmm.default else (qk.args[0], qk.args[1])
    return p.ok(pv, (pv, "eager", q, k, pv.args[1], sm), via + [qk])


def _row_max_of(m, x) -> bool:
    """``m`` is ``max(x, -1, keepdim)`` (``amax`` or ``max.dim``'s values)."""
    if is_op(m, {operator.getitem}) and m.args[1] == 0:
        m = m.args[0]
    return is_op(m, {aten.amax.default, aten.max.dim}) and m.args[0] is x


def _param_only(n, depth: int = 8) -> str | None:
    """The parameter/buffer a tensor is made of through shape ops and casts alone (a sink logit), else None."""
    for _ in range(depth):
        if not isinstance(n, fx.Node):
            return None
        if n.op == "get_attr":
            return str(n.target)
        if not is_op(n, SHAPE_OPS):
            return None
        n = n.args[0]
    return None


def _attention_sinks(p: Pattern, cat: fx.Node) -> Match | MatchFailure:
    """``cat([scores, sinks], -1)``: per-head learned logits appended as extra key columns (GPT-OSS)."""
    pieces = cat.args[0] if cat.args else []
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = len(cat.meta["val"].shape) if "val" in cat.meta else None
    if rank is None or dim not in (-1, rank - 1) or len(pieces) < 2:
        return p.fail(cat, "not a concatenation of several pieces along the key (last) dim")
    params = [_param_only(x) for x in pieces]
    scores = [x for x, w in zip(pieces, params) if w is None]
    if len(scores) != 1 or params[0] is not None:
        return p.fail(cat, "not one score tensor followed by pieces made only of parameters (sink logits)")
    return p.ok(cat, (scores[0], [w for w in params if w is not None]))


def _drops_sinks(u) -> bool:
    """``probs[..., :-k]``: the sink columns dropped after the softmax."""
    if not is_op(u, {aten.slice.Tensor}) or len(u.args) < 4:
        return False
    rank = len(u.args[0].meta["val"].shape) if "val" in u.args[0].meta else None
    return rank is not None and u.args[1] in (-1, rank - 1) and u.args[2] in (0, None) \
        and isinstance(u.args[3], int) and u.args[3] < 0


def _qkv_distinct(p: Pattern, core: fx.Node, q: LinearSite, k: LinearSite, v: LinearSite):
    if q is k or k is v or q is v:
        fused = q if q is k or q is v else k
        return p.fail(fused.node, f"q/k/v come from one fused projection ({fused.module_path}) that is not cut "
                                  "into contiguous channel ranges (e.g. a head-interleaved layout); one site never "
                                  "gets two roles")
    return p.ok(core, (q, k, v))


SDPA = Pattern("sdpa", frozenset({aten.scaled_dot_product_attention.default}),
               "aten.scaled_dot_product_attention(q, k, v, ...)", _sdpa)
EAGER_ATTENTION = Pattern("eager_attention", frozenset(SOFTMAX),
                          "matmul(q, kᵀ) → mask/scale/bias [→ sinks, − max] → softmax → [drop sinks, dropout] → "
                          "matmul(·, v)", _eager_attention)
ATTENTION_SINKS = Pattern("attention_sinks", frozenset(), "cat([QKᵀ scores, learned sink logits], -1) → softmax → "
                          "drop the sink columns: attention sinks, the scores are the first piece", _attention_sinks)
QKV_DISTINCT = Pattern("qkv_distinct", frozenset(), "q, k and v come from three different sites (or slices)",
                       _qkv_distinct)
ATTENTION_CORES = (SDPA, EAGER_ATTENTION)
CORE_INDEX = index(ATTENTION_CORES)


# --------------------------------------------------------------------------- traces
def _carries_tensor(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return val is None or isinstance(val, (torch.Tensor, list, tuple))


def _upstream(p: Trace, start: fx.Node, ctx) -> Match | MatchFailure:
    """Nearest linear site upstream of ``start`` through ``p.allowed`` ops (BFS by depth)."""
    seen, q = {start}, deque([start])
    parent = {start: None}
    steps = 0
    blocked, inputs = [], []
    while q and steps < p.limit:
        n = q.popleft()
        steps += 1
        hit = ctx.by_output.get(n)
        if hit:
            slices = [s for s in hit if s.split_output is n]
            site = slices[0] if slices else hit[0]
            return p.ok(site.node, site, _path_to(parent, n))
        srcs = node_args(n.args) if is_op(n, p.allowed) else filled_from(n) if p.allowed is QKV_TRACE_OPS else []
        if not srcs:
            if _carries_tensor(n):   # not the SymInt size arithmetic of dynamic shapes
                blocked.append(n)
            continue
        for a in srcs:
            if a not in seen and a.op == "call_function":
                seen.add(a)
                parent[a] = n
                q.append(a)
            elif a.op == "placeholder" and a not in inputs:
                inputs.append(a)
    if q:
        return p.fail(start, f"no linear site within {p.limit} nodes upstream through {p.through}")
    if blocked:
        stop = blocked[0]
        more = f" (and {len(blocked) - 1} other dead end(s))" if len(blocked) > 1 else ""
        return p.fail(stop, f"no linear site upstream: the trace stops here, an op outside {p.through}{more}",
                      _path_to(parent, stop))
    end = f"; it reaches the graph input {inputs[0].name}" if inputs else ""
    return p.fail(start, f"no linear site upstream through {p.through}{end}")


def _output_gate(u: fx.Node, x: fx.Node) -> bool:
    """``x * sigmoid(g)``: an output gate on the attention output (Qwen3-Next's gated attention)."""
    if not is_op(u, {aten.mul.Tensor}) or len(u.args) != 2 or x not in u.args:
        return False
    other = u.args[1] if u.args[0] is x else u.args[0]
    return is_op(strip(other), {aten.sigmoid.default})


def _downstream(p: Trace, start: fx.Node, ctx) -> Match | MatchFailure:
    """First linear site reading ``start`` through ``p.allowed`` ops."""
    seen, q = {start}, deque([start])
    parent = {start: None}
    stops = []
    while q:
        n = q.popleft()
        for s in ctx.by_input_chain.get(n, []):
            return p.ok(s.node, s, _path_to(parent, n))
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            # the view feeding an addmm is part of that site
            site = ctx.site_of_node.get(u)
            if site is not None:
                return p.ok(u, site, _path_to(parent, n))
            if is_op(u, p.allowed) or (p.gates and _output_gate(u, n)):
                parent[u] = n
                q.append(u)
            elif _carries_tensor(u):
                stops.append((u, n))
    if stops:
        stop, before = stops[0]
        more = f" (and {len(stops) - 1} other dead end(s))" if len(stops) > 1 else ""
        return p.fail(stop, f"no linear site reads the core's output: the trace stops here, an op outside "
                            f"{p.through}{more}", _path_to(parent, before) + [stop])
    return p.fail(start, "nothing reads the core's output")


def filled_from(n: fx.Node) -> list[fx.Node]:
    """What an empty buffer holds when it is filled piece by piece: ``buf = new_empty(…)`` then
    ``copy_(buf[…, a:b], x)`` for each piece (MLA's key: the no-RoPE part from ``kv_b``, the shared RoPE
    part from ``kv_a``). The sources ``x``, or [] when ``n`` is not such a buffer."""
    if not is_op(n, {aten.new_empty.default, aten.empty.memory_format, aten.new_zeros.default,
                     aten.zeros.default}):
        return []
    out = []
    for u in n.users:
        if is_op(u, {aten.slice.Tensor, aten.select.int}):
            out += [c.args[1] for c in u.users if is_op(c, {aten.copy_.default}) and c.args[0] is u
                    and isinstance(c.args[1], fx.Node)]
    return out


_UP_THROUGH = "shape, RoPE, GQA-repeat and scaling ops (and buffers filled piece by piece)"
QKV_TRACE_OPS = frozenset(QKV_OPS)
Q_TRACE, K_TRACE, V_TRACE = (
    Trace(f"{r}_trace", frozenset(), f"upstream from the core's {r} argument to the nearest linear site",
          _upstream, allowed=QKV_TRACE_OPS, through=_UP_THROUGH, limit=400) for r in "qkv")
O_TRACE = Trace("o_trace", frozenset(), "downstream from the core's output to the first linear site", _downstream,
                allowed=frozenset(SHAPE_OPS), through="shape ops (and a sigmoid output gate)", gates=True)
BRANCH_TRACE = Trace("branch_trace", frozenset(), "upstream from a residual branch to its projection", _upstream,
                     allowed=frozenset(BRANCH_TAIL | RESHAPES), through="dropout/scale/cast/reshape ops", limit=10)
DOWN_TRACE = Trace("down_trace", frozenset(), "upstream from an FFN branch to its down projection", _upstream,
                   allowed=frozenset(BRANCH_TAIL | {aten.view.default}), through="dropout/scale/cast/view ops",
                   limit=20)


def sites_feeding(ctx, node: fx.Node, used: set[int]) -> list[tuple[LinearSite, bool]]:
    """Linear sites upstream of ``node`` before any other projection; flag those behind an activation."""
    out: list[tuple[LinearSite, bool]] = []
    seen = set()
    q = deque([(node, False)])
    while q:
        n, act = q.popleft()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        hit = ctx.by_output.get(n)
        if hit:
            s = hit[0]
            if id(s) not in used and all(s is not o for o, _ in out):
                out.append((s, act))
            continue
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        is_act = name in ACTIVATIONS
        if is_op(n, {aten.layer_norm.default}) or name in ("rsqrt", "embedding"):
            continue
        for a in node_args(n.args):
            q.append((a, act or is_act))
        if len(seen) > 200:
            break
    return out


# --------------------------------------------------------------------------- residual points
def _parallel_sibling(p: Pattern, other: fx.Node, ctx, entry: fx.Node) -> Match | MatchFailure:
    r = ctx.matcher.run(BRANCH_TRACE, other, ctx)
    if not r:
        return p.fail(other, f"the add's other operand is not a projection output ({r.reason})")
    sib = r.value

    def source(n):  # the stream under a norm (NeoX gives each parallel branch its own LayerNorm)
        ns = norm_match(n, ctx.matcher)
        return strip(ns.value.input) if ns else strip(n)

    feeding = sites_feeding(ctx, sib.input, set())
    if any(source(s.input) is source(entry) for s, _ in feeding) or source(sib.input) is source(entry):
        return p.ok(other, sib)
    return p.fail(other, f"its projection {sib.name} does not read this sub-block's input")


def _residual_add(p: Pattern, out: fx.Node, ctx, entry: fx.Node | None = None) -> Match | MatchFailure:
    """From a projection output, follow dropout/scale to the add that closes the sub-block.

    ``value``: ``(add, branch, stream, sibling)``. In a parallel block (``x + attn(ln x) + mlp(ln x)``)
    the first add joins the two branches; it is recognised by the other operand coming from a
    projection whose own inputs read the same normed ``entry``, and the search goes on to the
    add with the stream.
    """
    frontier, seen, sibling = [out], set(), None
    stops = []
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_op(u, ADDS) and all(isinstance(a, fx.Node) for a in u.args[:2]):
                branch_i = 0 if u.args[0] is n else 1
                other = u.args[1 - branch_i]
                if sibling is None and entry is not None and ctx.matcher.run(PARALLEL_SIBLING, other, ctx, entry):
                    sibling = other
                    frontier = [u]
                    break
                return p.ok(u, (u, u.args[branch_i], other, sibling))
            if is_op(u, BRANCH_TAIL):
                frontier.append(u)
            else:
                stops.append(u)
    if stops:
        return p.fail(stops[0], "the projection output reaches no add through dropout/scale/cast ops; "
                                "it stops here")
    return p.fail(out, "nothing reads the projection output")


def _inside_norm(node: fx.Node, norm: NormSite) -> bool:
    # a node between norm.input and norm.output (the decomposed RMSNorm body)
    seen, q = set(), deque([norm.output])
    while q:
        n = q.popleft()
        if n is node:
            return True
        if n is norm.input or n in seen:
            continue
        seen.add(n)
        q.extend(node_args(n.args))
    return False


def _pre_ln(p: Pattern, site: ResidualSite, entry: fx.Node | None, matcher: Matcher) -> Match | MatchFailure:
    if entry is None:
        return p.fail(site.add, "the sub-block's input is unknown")
    r = norm_match(entry, matcher)
    if not r:
        return p.fail(entry, f"the sub-block's input is not a norm output ({r.reason})")
    if strip(r.value.input) is not strip(site.stream):
        return p.fail(entry, "the sub-block's input is a norm, but not of the residual stream")
    return p.ok(r.value.output, r.value)


def _post_ln(p: Pattern, site: ResidualSite, matcher: Matcher) -> Match | MatchFailure:
    norm = norm_consuming(site.add, matcher)
    if norm is None:
        return p.fail(site.add, "no norm reads the add")
    users, frontier = [], [site.add]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if is_op(u, PASSTHROUGH):
                frontier.append(u)
            elif not is_op(u, {aten.sym_size.int}):
                users.append(u)
    others = [u for u in users if not (u is norm.output or _inside_norm(u, norm))]
    if not others:
        return p.ok(norm.output, norm)
    return p.fail(others[0], f"the add also feeds this node besides the norm {norm.output.name}: "
                             "the stream continues un-normalised")


def norm_consuming(node: fx.Node, matcher: Matcher | None = None) -> NormSite | None:
    """The norm that takes ``node`` (or a value-preserving copy of it) as input, if any."""
    frontier = [node]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if is_op(u, {aten.layer_norm.default, aten.rms_norm.default}) and u.args[0] is n:
                r = norm_match(u, matcher)
                return r.value if r else None
            if is_op(u, {aten.pow.Tensor_Scalar}):
                # walk pow → mean → add → rsqrt → mul → [to] → mul(w); prefer the weighted form
                found = [r.value for r in (norm_match(f, matcher) for f in _forward_closure(u, 8))
                         if r and strip(r.value.input) is strip(n)]
                if found:
                    return next((ns for ns in found if ns.weight is not None), found[0])
            if is_op(u, PASSTHROUGH):
                frontier.append(u)
    return None


def _forward_closure(n: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [], [n]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            for u in f.users:
                if u not in out:
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
    return out


PARALLEL_SIBLING = Pattern("parallel_sibling", frozenset(), "x + attn(ln x) + mlp(ln x): the add's other operand "
                           "is a projection reading the same input", _parallel_sibling)
RESIDUAL_ADD = Pattern("residual_add", frozenset(ADDS), "projection output → [dropout/scale] → add(·, stream)",
                       _residual_add)
PRE_LN = Pattern("pre_ln", frozenset(), "the sub-block's input is a norm of the residual stream", _pre_ln)
POST_LN = Pattern("post_ln", frozenset(), "the add continues only through a norm", _post_ln)


# --------------------------------------------------------------------------- feed-forward
def stream_adds(stream_out: fx.Node, ctx) -> list[tuple[fx.Node, fx.Node]]:
    """``(add, via)`` for every tensor add reached from ``stream_out`` through pass-through/reshape ops
    (``via``: the add's operand on that path), in graph order: the candidate residual adds of a sub-block."""
    cands, frontier, seen = [], [stream_out], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_op(u, {aten.add.Tensor}) and all(isinstance(a, fx.Node) for a in u.args[:2]):
                cands.append((u, n))
            elif is_op(u, PASSTHROUGH | RESHAPES) or scalar_scale(u):
                frontier.append(u)
    return sorted(cands, key=lambda c: ctx.order[c[0]])


def scalar_scale(n) -> bool:
    """``n`` multiplies a tensor by a Python number (a fixed residual scale, e.g. ``residual * alpha``)."""
    return (is_op(n, {aten.mul.Tensor, aten.mul.Scalar}) and len(n.args) == 2
            and sum(isinstance(a, fx.Node) for a in n.args) == 1 and all(isinstance(a, (fx.Node, int, float))
                                                                        for a in n.args))


def _ffn(p: Pattern, stream_out: fx.Node, ctx, used: set[int]) -> Match | MatchFailure:
    """The first add on the stream whose branch comes from an unused linear site (down) fed by other sites.

    ``value``: ``(down, [(site, behind_activation)], ResidualSite)``.
    """
    rejected = []
    for add, via in stream_adds(stream_out, ctx):
        branch = add.args[1] if add.args[0] is via else add.args[0]
        r = ctx.matcher.run(DOWN_TRACE, branch, ctx)
        if not r:
            rejected.append((add, f"{add.name}: its branch is not a projection output ({r.describe()})"))
            continue
        down = r.value
        if id(down) in used:
            rejected.append((add, f"{add.name}: its branch comes from {down.name}, already "
                                  f"{'the ' + down.role if down.role else 'used'}"))
            continue
        ins = sites_feeding(ctx, down.input, used)
        if not ins:
            rejected.append((add, f"{add.name}: no unused linear site feeds {down.name}"))
            continue
        return p.ok(add, (down, ins, ResidualSite(add=add, branch=branch, stream=via)))
    if not rejected:
        return p.fail(stream_out, "no add reads the residual stream after this attention block")
    return p.fail(rejected[0][0], "no add on the stream closes a feed-forward block: "
                  + "; ".join(r for _, r in rejected[:3]) + (" …" if len(rejected) > 3 else ""))


def _ffn_parallel(p: Pattern, r: ResidualSite, ctx, used: set[int]) -> Match | MatchFailure:
    t = ctx.matcher.run(BRANCH_TRACE, r.parallel_with, ctx)
    if not t:
        return p.fail(r.parallel_with, f"the parallel branch is not a projection output ({t.reason})")
    down = t.value
    if id(down) in used:
        return p.fail(down.node, f"the parallel branch comes from {down.name}, already used")
    ins = sites_feeding(ctx, down.input, used)
    if not ins:
        return p.fail(down.node, f"no unused linear site feeds {down.name}")
    return p.ok(r.add, (down, ins, r))


def _ffn_gate(p: Pattern, down: LinearSite, ins: list) -> Match | MatchFailure:
    gated = [s for s, act in ins if act]
    plain = [s for s, act in ins if not act]
    if len(ins) >= 2 and gated and plain:
        return p.ok(gated[0].node, (gated[0], plain[0]))
    if len(ins) == 1:
        return p.fail(down.node, f"one linear site ({ins[0][0].name}) feeds down: up, no gate")
    return p.fail(down.node, "the sites feeding down are not one behind an activation and one plain")


FFN = Pattern("ffn", frozenset(), "stream → add(stream, down(act(up(x)) [* gate...])): the next add whose branch "
              "is an unused projection fed by other projections", _ffn)
FFN_PARALLEL = Pattern("ffn_parallel", frozenset(), "the sibling branch of a parallel block, as an FFN",
                       _ffn_parallel)
FFN_GATE = Pattern("ffn_gate", frozenset(), "of the sites feeding down, the one behind an activation is the gate "
                   "(SwiGLU), the plain one up", _ffn_gate)

PATTERNS: dict[str, Pattern] = {p.name: p for p in (
    LINEAR, ADDMM, MM, MATMUL_PARAM, FUSED_SPLIT, SDPA, EAGER_ATTENTION, ATTENTION_SINKS, QKV_DISTINCT,
    LAYER_NORM, RMS_NORM, RMS_NORM_DECOMPOSED, Q_TRACE, K_TRACE, V_TRACE, O_TRACE, BRANCH_TRACE, DOWN_TRACE,
    PARALLEL_SIBLING, RESIDUAL_ADD, PRE_LN, POST_LN, FFN, FFN_PARALLEL, FFN_GATE)}
