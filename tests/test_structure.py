"""Structure recognition: every layer found, every role assigned, residual/norm placement right.

One table; each row is what a reader of the architecture's paper would say about it. The
module paths in the table are the *expected answers*; recognition itself never reads names.
"""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.structure import recognize

from helpers import upstream, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, tiny_vit

# name: (builder, layers per stack, stacks, placement, norm kind, expected role → path template,
#        ffn gate?, fused qkv?, heads, kv heads)
TABLE = {
    "bert": (tiny_bert, [2], "post_ln", "layer_norm",
             {"q": "encoder.layer.{i}.attention.self.query", "k": "encoder.layer.{i}.attention.self.key",
              "v": "encoder.layer.{i}.attention.self.value", "o": "encoder.layer.{i}.attention.output.dense",
              "up": "encoder.layer.{i}.intermediate.dense", "down": "encoder.layer.{i}.output.dense"},
             {"mh": "encoder.layer.{i}.attention.output.LayerNorm", "output": "encoder.layer.{i}.output.LayerNorm"},
             4, 4),
    "roberta": (tiny_roberta, [2], "post_ln", "layer_norm",
                {"q": "encoder.layer.{i}.attention.self.query", "v": "encoder.layer.{i}.attention.self.value",
                 "o": "encoder.layer.{i}.attention.output.dense", "up": "encoder.layer.{i}.intermediate.dense",
                 "down": "encoder.layer.{i}.output.dense"},
                {"mh": "encoder.layer.{i}.attention.output.LayerNorm", "output": "encoder.layer.{i}.output.LayerNorm"},
                4, 4),
    "gpt2": (tiny_gpt2, [2], "pre_ln", "layer_norm",
             {"q": "h.{i}.attn.c_attn.q", "k": "h.{i}.attn.c_attn.k", "v": "h.{i}.attn.c_attn.v",
              "o": "h.{i}.attn.c_proj", "up": "h.{i}.mlp.c_fc", "down": "h.{i}.mlp.c_proj"},
             {"mh": "h.{i}.ln_1", "output": "h.{i}.ln_2"}, 4, 4),
    "llama": (tiny_llama, [2], "pre_ln", "rms_norm",
              {"q": "layers.{i}.self_attn.q_proj", "k": "layers.{i}.self_attn.k_proj",
               "v": "layers.{i}.self_attn.v_proj", "o": "layers.{i}.self_attn.o_proj",
               "up": "layers.{i}.mlp.up_proj", "gate": "layers.{i}.mlp.gate_proj", "down": "layers.{i}.mlp.down_proj"},
              {"mh": "layers.{i}.input_layernorm", "output": "layers.{i}.post_attention_layernorm"}, 4, 2),
    "t5": (tiny_t5, [2, 2], "pre_ln", "rms_norm",
           {"q": "{stack}.block.{i}.layer.0.SelfAttention.q", "k": "{stack}.block.{i}.layer.0.SelfAttention.k",
            "v": "{stack}.block.{i}.layer.0.SelfAttention.v", "o": "{stack}.block.{i}.layer.0.SelfAttention.o",
            "up": "{stack}.block.{i}.layer.{f}.DenseReluDense.wi", "down": "{stack}.block.{i}.layer.{f}.DenseReluDense.wo"},
           {"mh": "{stack}.block.{i}.layer.0.layer_norm", "output": "{stack}.block.{i}.layer.{f}.layer_norm"}, 4, 4),
    "vit": (tiny_vit, [2], "pre_ln", "layer_norm",
            None, {"mh": "{p}.layernorm_before", "output": "{p}.layernorm_after"}, 4, 4),
}


@pytest.fixture(scope="module")
def maps():
    return {}


def _map(name, maps):
    if name not in maps:
        model = TABLE[name][0]()
        maps[name] = (model, recognize(ga.capture(model)))
    return maps[name]


@pytest.mark.parametrize("name", list(TABLE))
def test_recognition_table(name, maps):
    builder, per_stack, placement, norm_kind, roles, norms, heads, kv = TABLE[name]
    model, sm = _map(name, maps)
    assert [sum(1 for l in sm.layers if l.stack == s) for s in range(len(per_stack))] == per_stack
    assert len(sm.stacks) == len(per_stack)
    for layer in sm.layers:
        stack = ("encoder", "decoder")[layer.stack] if name == "t5" else None
        i = layer.index_in_stack
        fmt = dict(i=i, stack=stack, f=2 if stack == "decoder" else 1, p=layer.module_path)
        a = layer.attention
        assert a.self_attention and a.form == "sdpa"
        assert (a.num_heads, a.num_kv_heads) == (heads, kv)
        got = {s.role: s.name for s in layer.linear_sites() if s not in (
            layer.cross_attention.q, layer.cross_attention.k, layer.cross_attention.v, layer.cross_attention.o)
            } if layer.cross_attention else {s.role: s.name for s in layer.linear_sites()}
        want_roles = {"q", "k", "v", "o", "up", "down"} | ({"gate"} if name == "llama" else set())
        assert set(got) == want_roles, got
        if roles is not None:
            for role, tmpl in roles.items():
                assert got[role] == tmpl.format(**fmt), (role, got[role])
        # residual adds and their norms
        res = layer.residual_sites()
        assert set(res) >= {"mh", "output"}
        for pos, site in res.items():
            if pos == "cross":
                continue
            assert site.placement == placement, (pos, site.placement)
            norm = site.norm_after or site.norm_before
            assert norm.kind == norm_kind
            assert norm.weight.rsplit(".", 1)[0] == norms[pos].format(**fmt)
            # the branch is the sub-block output, the stream the residual input
            assert site.add.args[:2] in ((site.branch, site.stream), (site.stream, site.branch))
        # the attention branch comes from o, the FFN branch from down (through dropout only)
        assert a.o.output in upstream(a.residual.branch, 3)
        assert layer.ffn.down.output in upstream(layer.ffn.residual.branch, 3)
    if name == "t5":
        dec = [l for l in sm.layers if l.stack == 1]
        assert all(l.cross_attention is not None and not l.cross_attention.self_attention for l in dec)
        assert all(l.cross_attention is None for l in sm.layers if l.stack == 0)
        for l in dec:
            x = l.cross_attention
            assert x.q.name.endswith("EncDecAttention.q") and x.k.name.endswith("EncDecAttention.k")
            assert x.residual.placement == "pre_ln"
    else:
        assert all(l.cross_attention is None for l in sm.layers)


def test_gpt2_fused_qkv_slices(maps):
    _, sm = _map("gpt2", maps)
    a = sm.layers[0].attention
    assert a.q.layout == "conv1d" and a.q.fused
    assert (a.q.out_slice, a.k.out_slice, a.v.out_slice) == ((0, 32), (32, 64), (64, 96))
    assert a.q.total_out == 96 and a.q.weight == "h.0.attn.c_attn.weight"
    assert a.o.layout == "conv1d" and not a.o.fused


def test_llama_gqa_and_swiglu(maps):
    _, sm = _map("llama", maps)
    layer = sm.layers[0]
    assert layer.attention.k.out_features == layer.attention.q.out_features // 2  # 2 kv heads of 4
    assert layer.ffn.activation == "silu"
    assert layer.ffn.gate.name.endswith("gate_proj") and layer.ffn.up.name.endswith("up_proj")


def test_unmatched_have_reasons(maps):
    _, sm = _map("bert", maps)
    pooler = [u for u in sm.unmatched if u.where == "pooler.dense"]
    assert pooler and "not part of a recognised" in pooler[0].reason


def test_roles_do_not_depend_on_names():
    """Renaming every module must not change what is recognised (roles come from dataflow)."""
    model = tiny_bert()
    sm1 = recognize(ga.capture(model))

    class Renamed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.zz = inner

        def forward(self, input_ids, attention_mask):
            return self.zz(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    kw = dict(input_ids=torch.randint(0, 100, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long))
    sm2 = recognize(ga.capture(Renamed(model), example_kwargs=kw))
    assert [[s.role for s in l.linear_sites()] for l in sm1.layers] == \
           [[s.role for s in l.linear_sites()] for l in sm2.layers]
    assert sm2.layers[0].attention.q.name == "zz.encoder.layer.0.attention.self.query"


def test_inspect_report_and_table():
    from graphadapt.structure.report import format_report

    rep = ga.inspect(tiny_llama())
    assert rep["num_layers"] == 2 and rep["layers"][0]["attention"]["kv_heads"] == 2
    table = format_report(rep)
    assert "layers.0.self_attn.q_proj" in table and "pre_ln" in table and "rms_norm" in table
