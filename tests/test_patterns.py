"""Recognition patterns one by one on hand-built ATen graphs, then why-queries on a whole model.

Each pattern gets a positive graph (it matches, and recognises the right thing) and a negative one
(it returns a ``MatchFailure`` naming the pattern, the node where it gave up and why).
"""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphadapt as ga
from graphadapt.structure import patterns as P
from graphadapt.structure import recognize
from graphadapt.structure.linear import find_linear_sites
from graphadapt.structure.recognize import _Recognizer
from graphadapt.structure.explain import why
from graphadapt.structure.types import ResidualSite

aten = torch.ops.aten
D = 8


class G:
    """A hand-built ATen graph: parameters on a bare module, ``meta['val']`` computed eagerly."""

    def __init__(self, **params):
        self.root = nn.Module()
        for name, shape in params.items():
            self.root.register_parameter(name, nn.Parameter(torch.randn(*shape)))
        self.g = fx.Graph()

    def x(self, name="x", shape=(2, 3, D)):
        n = self.g.placeholder(name)
        n.meta["val"] = torch.randn(*shape)
        return n

    def w(self, name):
        n = self.g.get_attr(name)
        n.meta["val"] = getattr(self.root, name).detach()
        return n

    def op(self, target, *args, **kwargs):
        n = self.g.call_function(target, args, kwargs)
        val = lambda a: a.meta["val"] if isinstance(a, fx.Node) else [val(b) for b in a] if isinstance(a, list) else a
        n.meta["val"] = target(*[val(a) for a in args], **kwargs)
        return n

    def gm(self, *outs) -> fx.GraphModule:
        self.g.output(outs[0] if len(outs) == 1 else tuple(outs))
        return fx.GraphModule(self.root, self.g)


def heads(g, t):
    return g.op(aten.transpose.int, g.op(aten.view.default, t, [2, 3, 2, D // 2]), 1, 2)


# --------------------------------------------------------------------------- linear forms
def test_linear_and_its_failure():
    g = G(w=(12, D), b=(12,))
    x, act = g.x(), g.x("a", (12, D))
    y = g.op(aten.linear.default, x, g.w("w"), g.w("b"))
    bad = g.op(aten.linear.default, x, act)
    gm = g.gm(y, bad)
    r = P.LINEAR.match(y, gm)
    assert r and r.value.weight == "w" and r.value.bias == "b"
    assert (r.value.in_features, r.value.out_features, r.value.pattern) == (D, 12, "linear")
    f = P.LINEAR.match(bad, gm)
    assert not f and f.pattern == "linear" and f.node is bad and "2-d parameter" in f.reason
    sites, unmatched = find_linear_sites(gm)
    assert [s.node for s in sites] == [y] and [u.where for u in unmatched] == [bad.name]


def test_addmm_conv1d_view_addmm_view():
    g = G(w=(D, 12), b=(12,))
    x = g.x()
    flat = g.op(aten.view.default, x, [-1, D])
    mm = g.op(aten.addmm.default, g.w("b"), flat, g.w("w"))
    out = g.op(aten.view.default, mm, [2, 3, 12])
    gm = g.gm(out)
    s = P.ADDMM.match(mm, gm).value
    assert s.layout == "conv1d" and s.input is x and s.output is out and (s.in_features, s.out_features) == (D, 12)


def test_mm_with_transposed_weight_and_activation_product():
    g = G(w=(12, D))
    x, y = g.x("x", (6, D)), g.x("y", (D, 5))
    mm = g.op(aten.mm.default, x, g.op(aten.t.default, g.w("w")))
    act = g.op(aten.mm.default, x, y)
    gm = g.gm(mm, act)
    s = P.MM.match(mm, gm).value
    assert s.layout == "linear" and s.bias is None and s.out_features == 12
    f = P.MM.match(act, gm)
    assert not f and f.pattern == "mm" and "two activations" in f.reason


def test_matmul_param_x_at_wT_and_attention_scores():
    g = G(w=(12, D))
    x = g.x()
    y = g.op(aten.matmul.default, x, g.op(aten.t.default, g.w("w")))
    scores = g.op(aten.matmul.default, x, g.op(aten.transpose.int, x, -1, -2))
    gm = g.gm(y, scores)
    assert P.MATMUL_PARAM.match(y, gm).value.out_features == 12
    f = P.MATMUL_PARAM.match(scores, gm)
    assert not f and f.node is scores and "activation @ activation" in f.reason
    assert [s.node for s in find_linear_sites(gm)[0]] == [y]


@pytest.mark.parametrize("form", ["split", "chunk", "slice"])
def test_fused_split_gives_one_site_per_piece(form):
    g = G(w=(3 * D, D))
    y = g.op(aten.linear.default, g.x(), g.w("w"))
    if form == "slice":
        pieces = [g.op(aten.slice.Tensor, y, -1, i * D, (i + 1) * D) for i in range(3)]
    else:
        sp = g.op(aten.split.Tensor, y, D, -1) if form == "split" else g.op(aten.chunk.default, y, 3, -1)
        pieces = [g.op(operator.getitem, sp, i) for i in range(3)]
    gm = g.gm(*pieces)
    sites, _ = find_linear_sites(gm)
    assert [s.out_slice for s in sites] == [(0, D), (D, 2 * D), (2 * D, 3 * D)]
    assert [s.split_output for s in sites] == pieces and all(s.total_out == 3 * D for s in sites)


def test_fused_split_rejects_head_interleaved_and_wrong_dim():
    g = G(w=(3 * D, D))
    y = g.op(aten.linear.default, g.x(), g.w("w"))
    v = g.op(aten.view.default, y, [2, 3, 2, 3 * D // 2])            # heads first, then split: interleaved
    sp = g.op(aten.split.Tensor, v, D // 2, -1)
    y2 = g.op(aten.linear.default, g.x("x2"), g.w("w"))
    sp2 = g.op(aten.split.Tensor, y2, 1, 0)
    gm = g.gm(g.op(operator.getitem, sp, 0), g.op(operator.getitem, sp2, 0), g.op(operator.getitem, sp2, 1))
    f = P.FUSED_SPLIT.match(y, D * 3)
    assert not f and f.pattern == "fused_split" and f.node is v and "not split/chunk/slice" in f.reason
    f2 = P.FUSED_SPLIT.match(y2, D * 3)
    assert not f2 and f2.node is sp2 and "not the channel" in f2.reason
    assert all(not s.fused for s in find_linear_sites(gm)[0])


# --------------------------------------------------------------------------- norms
def test_layer_norm_and_rms_norm_ops():
    g = G(w=(D,), b=(D,))
    x = g.x()
    ln = g.op(aten.layer_norm.default, x, [D], g.w("w"), g.w("b"), 1e-5)
    rms = g.op(aten.rms_norm.default, x, [D], g.w("w"), 1e-6)
    relu = g.op(aten.relu.default, x)
    g.gm(ln, rms, relu)
    r = P.norm_match(ln)
    assert r.pattern == "layer_norm" and (r.value.kind, r.value.weight, r.value.bias) == ("layer_norm", "w", "b")
    r = P.norm_match(rms)
    assert r.pattern == "rms_norm" and r.value.eps == 1e-6 and r.value.input is x
    f = P.norm_match(relu)
    assert not f and f.node is relu and "not a norm output" in f.reason


def _rms(g, x, power=2, offset=None):
    pw = g.op(aten.pow.Tensor_Scalar, x, power)
    mean = g.op(aten.mean.dim, pw, [-1], True)
    r = g.op(aten.rsqrt.default, g.op(aten.add.Tensor, mean, 1e-6))
    w = g.w("w") if offset is None else g.op(aten.add.Tensor, g.w("w"), offset)
    return g.op(aten.mul.Tensor, w, g.op(aten.mul.Tensor, x, r))


def test_rms_norm_decomposed_and_gemma_offset():
    g = G(w=(D,))
    x = g.x()
    plain, gemma, cubed = _rms(g, x), _rms(g, x, offset=1.0), _rms(g, x, power=3)
    g.gm(plain, gemma, cubed)
    r = P.norm_match(plain)
    assert r.pattern == "rms_norm_decomposed" and r.value.weight == "w" and r.value.eps == 1e-6
    assert r.value.input is x and r.value.output is plain
    assert P.norm_match(gemma).value.weight_offset == 1.0
    f = P.norm_match(cubed)
    assert not f and f.pattern == "rms_norm_decomposed" and "pow(x, 2)" in f.reason
    assert f.node.target == aten.mean.dim


# --------------------------------------------------------------------------- attention cores
def _eager(g, q, k, v, tail=True):
    s = g.op(aten.matmul.default, q, g.op(aten.transpose.int, k, -1, -2))
    s = g.op(aten.add.Tensor, g.op(aten.div.Tensor, s, 2.0), g.x("mask", (2, 1, 3, 3)))
    p = g.op(aten.softmax.int, s, -1)
    if not tail:
        return p, p
    return g.op(aten.matmul.default, g.op(aten.dropout.default, p, 0.1, False), v), p


def test_sdpa_and_eager_attention():
    g = G()
    q, k, v = (g.x(n, (2, 2, 3, 4)) for n in "qkv")
    sd = g.op(aten.scaled_dot_product_attention.default, q, k, v)
    pv, sm = _eager(g, q, k, v)
    gm = g.gm(sd, pv)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    m = P.Matcher()
    assert m.first(P.CORE_INDEX, sd, order).value == (sd, "sdpa", q, k, v, None)
    r = m.first(P.CORE_INDEX, sm, order)
    core, form, q_arg, k_arg, v_arg, softmax = r.value
    assert r.pattern == "eager_attention" and (core, form, q_arg, v_arg, softmax) == (pv, "eager", q, v, sm)
    assert k_arg.target == aten.transpose.int and k_arg.args[0] is k
    assert m.first(P.CORE_INDEX, q, order) is None                  # no pattern indexed by a placeholder
    assert (m.stats["sdpa"].tried, m.stats["eager_attention"].matched) == (1, 1)


def test_eager_attention_rejects_a_classifier_softmax_and_a_dangling_one():
    g = G(w=(5, D))
    logits = g.op(aten.linear.default, g.x(), g.w("w"))
    cls = g.op(aten.softmax.int, logits, -1)
    q, k, v = (g.x(n, (2, 2, 3, 4)) for n in "qkv")
    _, dangling = _eager(g, q, k, v, tail=False)
    gm = g.gm(cls, dangling)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    f = P.EAGER_ATTENTION.match(cls, order)
    assert not f and f.pattern == "eager_attention" and f.node is logits and "neither a mask" in f.reason
    f = P.EAGER_ATTENTION.match(dangling, order)
    assert not f and f.node is dangling and "no matmul(·, V)" in f.reason


# --------------------------------------------------------------------------- traces
def _attention_graph(q_through=None, fused=False, k_start=4):
    g = G(wq=(D, D), wk=(D, D), wv=(D, D), wo=(D, D), wqkv=(3 * D, D))
    x = g.x()
    if fused:
        qkv = g.op(aten.linear.default, x, g.w("wqkv"))
        q = k = v = g.op(aten.view.default, qkv, [2, 3, 2, 3 * D // 2])
        q, k, v = (g.op(aten.slice.Tensor, q, -1, s, s + 4) for s in (0, k_start, 8))
        q, k, v = (g.op(aten.transpose.int, t, 1, 2) for t in (q, k, v))
    else:
        q = g.op(aten.linear.default, x, g.w("wq"))
        if q_through is not None:
            q = g.op(q_through, q)
        q, k, v = heads(g, q), heads(g, g.op(aten.linear.default, x, g.w("wk"))), \
            heads(g, g.op(aten.linear.default, x, g.w("wv")))
    core = g.op(aten.scaled_dot_product_attention.default, q, k, v)
    a = g.op(aten.reshape.default, g.op(aten.transpose.int, core, 1, 2), [2, 3, D])
    o = g.op(aten.linear.default, a, g.w("wo"))
    out = g.op(aten.add.Tensor, x, g.op(aten.dropout.default, o, 0.1, False))
    gm = g.gm(out)
    return gm, _Recognizer(gm), core, o, out


def test_q_trace_finds_the_projection_through_shape_ops():
    gm, rec, core, *_ = _attention_graph()
    r = P.Q_TRACE.match(core.args[0], rec)
    assert r and r.value.weight == "wq" and r.node.target == aten.linear.default
    assert [n.target for n in r.via] == [aten.transpose.int, aten.view.default, aten.linear.default]


def test_q_trace_failure_names_the_blocking_node():
    gm, rec, core, *_ = _attention_graph(q_through=aten.tanh.default)
    f = P.Q_TRACE.match(core.args[0], rec)
    assert not f and f.pattern == "q_trace" and f.node.target == aten.tanh.default
    assert "no linear site upstream" in f.reason and "shape, RoPE" in f.reason
    assert [n.target for n in f.via][-1] == aten.tanh.default
    assert P.K_TRACE.match(core.args[1], rec)                       # k is untouched
    sm = recognize(gm)
    assert not sm.layers                                            # the block is dropped, and why() says so
    assert "q_trace rejected at tanh" in why(sm, "q", layer=0)


def test_q_trace_reaching_an_input():
    g = G()
    x = g.x()
    v = g.op(aten.view.default, x, [2, 3, 2, 4])
    gm = g.gm(v)
    f = P.Q_TRACE.match(v, _Recognizer(gm))
    assert not f and f.node is v and "graph input x" in f.reason


def test_qkv_distinct_rejects_one_fused_interleaved_projection():
    gm, rec, core, *_ = _attention_graph(fused=True)
    q, k, v = (P.Q_TRACE.match(a, rec).value for a in core.args[:3])
    assert q is k is v
    f = P.QKV_DISTINCT.match(core, q, k, v)
    assert not f and f.pattern == "qkv_distinct" and f.node is q.node and "fused projection" in f.reason
    # head-interleaved ([h0: q k v | h1: q k v]): each role gets its channel index set instead
    sm = recognize(gm)
    a = sm.layers[0].attention
    assert (a.q.out_rows, a.k.out_rows, a.v.out_rows) == ((0, 1, 2, 3, 12, 13, 14, 15), (4, 5, 6, 7, 16, 17, 18, 19),
                                                         (8, 9, 10, 11, 20, 21, 22, 23))
    assert a.o is not None and a.q.name == ".q" and "qkv_rows matched" in why(sm, "k", 0)


def test_qkv_rows_rejects_roles_sharing_channels():
    gm, *_ = _attention_graph(fused=True, k_start=2)    # k overlaps q's channels: no role gets them
    sm = recognize(gm)
    assert sm.layers[0].attention.q is None and sm.layers[0].attention.o is not None
    assert "qkv_rows rejected" in why(sm, "k", 0) and "same channels" in why(sm, "k", 0)
    assert any("nor into per-role channel sets" in u.reason for u in sm.unmatched)


def test_o_trace_and_its_failure():
    gm, rec, core, o, _ = _attention_graph()
    r = P.O_TRACE.match(core, rec)
    assert r and r.node is o and r.value.weight == "wo"
    g = G(w=(D, D))
    c = g.x("c", (2, 3, D))
    relu = g.op(aten.relu.default, g.op(aten.view.default, c, [2, 3, D]))
    gm2 = g.gm(g.op(aten.linear.default, relu, g.w("w")))
    f = P.O_TRACE.match(c, _Recognizer(gm2))
    assert not f and f.pattern == "o_trace" and f.node is relu and "shape ops" in f.reason


# --------------------------------------------------------------------------- residual points
def test_residual_add_through_dropout_and_failure():
    gm, rec, core, o, out = _attention_graph()
    r = P.RESIDUAL_ADD.match(o, rec, None)
    add, branch, stream, sibling = r.value
    assert add is out and branch.target == aten.dropout.default and stream.op == "placeholder" and sibling is None
    g = G(w=(D, D))
    y = g.op(aten.linear.default, g.x(), g.w("w"))
    relu = g.op(aten.relu.default, y)
    gm2 = g.gm(relu)
    f = P.RESIDUAL_ADD.match(y, _Recognizer(gm2), None)
    assert not f and f.pattern == "residual_add" and f.node is relu


def _block(post_ln: bool, leak: bool = False):
    """``x + o(ln x)`` (pre-LN) or ``ln(x + o(x))`` (post-LN); ``leak``: the add also feeds a relu."""
    g = G(w=(D, D), lw=(D,), lb=(D,))
    x = g.x()
    entry = x if post_ln else g.op(aten.layer_norm.default, x, [D], g.w("lw"), g.w("lb"), 1e-5)
    o = g.op(aten.linear.default, entry, g.w("w"))
    add = g.op(aten.add.Tensor, o, x)
    outs = [g.op(aten.layer_norm.default, add, [D], g.w("lw"), g.w("lb"), 1e-5) if post_ln else add]
    if leak:
        outs.append(g.op(aten.relu.default, add))
    g.gm(*outs)
    return ResidualSite(add=add, branch=o, stream=x), entry, outs


def test_pre_ln_and_post_ln():
    site, entry, _ = _block(post_ln=False)
    m = P.Matcher()
    r = m.run(P.PRE_LN, site, entry, m)
    assert r and r.value.kind == "layer_norm" and r.value.output is entry
    site, entry, outs = _block(post_ln=True)
    f = m.run(P.PRE_LN, site, entry, m)
    assert not f and f.pattern == "pre_ln" and f.node is entry and "not a norm output" in f.reason
    r = m.run(P.POST_LN, site, m)
    assert r and r.value.output is outs[0]
    assert (m.stats["pre_ln"].tried, m.stats["pre_ln"].matched) == (2, 1)


def test_post_ln_rejects_a_stream_that_also_continues_unnormalised():
    site, _, outs = _block(post_ln=True, leak=True)
    f = P.POST_LN.match(site, P.Matcher())
    assert not f and f.pattern == "post_ln" and f.node is outs[1] and "besides the norm" in f.reason


# --------------------------------------------------------------------------- feed-forward
def _ffn_graph(gated: bool, broken: bool = False):
    g = G(wu=(16, D), wg=(16, D), wd=(D, 16))
    s = g.x()
    up = g.op(aten.linear.default, s, g.w("wu"))
    h = g.op(aten.mul.Tensor, g.op(aten.silu.default, g.op(aten.linear.default, s, g.w("wg"))), up) if gated \
        else g.op(aten.gelu.default, up)
    branch = g.op(aten.linear.default, h, g.w("wd"))
    if broken:
        branch = g.op(aten.relu.default, branch)
    add = g.op(aten.add.Tensor, s, branch)
    gm = g.gm(add)
    return gm, _Recognizer(gm), s, add


def test_ffn_and_ffn_gate():
    gm, rec, s, add = _ffn_graph(gated=True)
    r = P.FFN.match(s, rec, set())
    down, ins, res = r.value
    assert r.node is add and down.weight == "wd" and res.add is add and res.stream is s
    gate = P.FFN_GATE.match(down, ins)
    assert gate and (gate.value[0].weight, gate.value[1].weight) == ("wg", "wu")
    gm, rec, s, add = _ffn_graph(gated=False)
    down, ins, _ = P.FFN.match(s, rec, set()).value
    f = P.FFN_GATE.match(down, ins)
    assert not f and f.pattern == "ffn_gate" and "up, no gate" in f.reason


def test_ffn_failure_says_which_add_and_why():
    gm, rec, s, add = _ffn_graph(gated=False, broken=True)
    f = P.FFN.match(s, rec, set())
    assert not f and f.pattern == "ffn" and f.node is add
    assert "down_trace rejected" in f.reason and "relu" in f.reason


def test_catalogue_is_declarative():
    assert len(P.PATTERNS) >= 20
    assert all(p.what and p.name == name for name, p in P.PATTERNS.items())
    assert P.LINEAR_INDEX[aten.linear.default] == [P.LINEAR]
    assert P.CORE_INDEX[aten._softmax.default] == [P.EAGER_ATTENTION]


# --------------------------------------------------------------------------- whole model
class _Block(nn.Module):
    def __init__(self, broken: bool):
        super().__init__()
        self.broken = broken
        self.ln1, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln1(x)
        q = torch.tanh(self.q(h)) if self.broken else self.q(h)    # soft-capped q: no longer a plain trace
        split = lambda t: t.view(B, T, 2, C // 2).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(broken=i == 1) for i in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def broken_report():
    torch.manual_seed(0)
    return ga.inspect(_Tiny().eval(), (torch.randn(2, 5, 16),))


def test_why_names_the_node_and_pattern_that_lost_a_layers_q(broken_report):
    rep = broken_report
    assert rep["num_layers"] == 2                                     # layers 0 and 2; layer 1 dropped
    why = rep.why("q", layer=1)
    assert "layer 1 attention" in why and "not a recognised layer" in why
    assert "pattern q_trace rejected at tanh (aten.tanh.default) in layers.1" in why
    assert "no linear site upstream" in why
    ok = rep.why("q", layer=2)
    assert "found layers.2.q" in ok and "pattern q_trace matched" in ok and "recognised as layer 1" in ok
    assert "not searched, the attention core was dropped" in rep.why("o", layer=1)
    (entry,) = rep.why_entries("q", layer=1)
    assert entry["found"] is False and entry["evidence"][0]["node"] == "tanh"
    assert entry["evidence"][0]["pattern"] == "q_trace"
    assert rep["pattern_stats"]["q_trace"] == {"tried": 3, "matched": 2}


def test_why_found_roles_residual_and_ffn(broken_report):
    rep = broken_report
    res = rep.why("residual", layer=0)
    assert "pre_ln" in res and "pattern pre_ln matched" in res and "layers.0.ln1" in res
    ffn = rep.why("ffn", layer=0)
    assert "found layers.0.down" in ffn and "found layers.0.up" in ffn and "up, no gate" in ffn
    assert "pattern sdpa matched" in rep.why("attention")
    gates = rep.why_entries("gate")
    assert [e["layer"] for e in gates] == [0, 1, 2] and not any(e["found"] for e in gates)
    assert gates[0]["evidence"][0]["pattern"] == "ffn_gate" and not gates[1]["evidence"]
    assert rep.why("q", layer=9).startswith("no layer 9")
    with pytest.raises(ga.GraphAdaptError, match="unknown role 'qq'"):
        rep.why("qq")


def test_cli_inspect_why(capsys):
    from graphadapt.cli import main

    assert main(["inspect", "--model", "tiny-llama", "--why", "q", "--layer", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["why"] == "q" and rep["layer"] == 1
    assert "layers.1.self_attn.q_proj" in rep["answer"] and "pattern q_trace matched" in rep["answer"]
    (entry,) = rep["entries"]
    assert entry["found"] and entry["site"] == "layers.1.self_attn.q_proj" and entry["site_pattern"] == "linear"
    with pytest.raises(SystemExit):
        main(["inspect", "--model", "tiny-llama", "--why", "nope"])
