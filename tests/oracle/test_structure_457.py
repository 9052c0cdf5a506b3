"""Capture and structure recognition on transformers 4.57 (oracle venv), where the graphs differ from 5.x.

On 4.57 T5 attention is eager (``matmul(q, kᵀ) → add_(position_bias) → softmax → type_as → dropout →
matmul(·, v)``, no scaling) and ViT — and BART when called without an ``attention_mask`` — call SDPA with no mask
argument. For BERT, GPT-2, Llama, T5 (encoder + decoder, self + cross), ViT and BART: every layer is found, every
role lands on the module a reader of the architecture would name, the attention form is the one 4.57 emits,
decoders have cross attention, residual placement is post-LN for BERT/BART and pre-LN for the rest, and the
captured module equals the eager model on new shapes (padding included). Last, LoRA on the eager-T5 graph: merged
equals unmerged, and both differ from the base.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.structure import recognize
from helpers import upstream, build_seeded, t5_inputs, text_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, vit_inputs

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


def test_env_is_457():
    assert T.__version__.startswith("4.57"), T.__version__


def tiny_bart(seed: int = 0):
    cfg = T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return build_seeded(lambda: T.BartModel(cfg), seed)


def _bart_nomask_kwargs(batch, seq, dec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 100, (batch, seq), generator=g),
            "decoder_input_ids": torch.randint(3, 100, (batch, dec), generator=g)}


def _t5_new_inputs():
    x = t5_inputs(batch=3, seq=7, dec_seq=5, seed=3)
    x["attention_mask"] = text_inputs(3, 7, seed=3, pad=2)["attention_mask"]
    return x


def _bart_new_inputs():
    x = text_inputs(3, 7, seed=3, pad=2)
    x["decoder_input_ids"] = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    return x


# name: builder, capture kwargs (None: synthesized), new-shape inputs, layers per stack, placement, norm kind,
#       attention form, role → module path template, position → norm module template
STACK = "{stack}"
CASES = {
    "bert": (tiny_bert, None, lambda: text_inputs(3, 7, seed=3, pad=2), [2], "post_ln", "layer_norm", "sdpa",
             {"q": "encoder.layer.{i}.attention.self.query", "k": "encoder.layer.{i}.attention.self.key",
              "v": "encoder.layer.{i}.attention.self.value", "o": "encoder.layer.{i}.attention.output.dense",
              "up": "encoder.layer.{i}.intermediate.dense", "down": "encoder.layer.{i}.output.dense"},
             {"mh": "encoder.layer.{i}.attention.output.LayerNorm", "output": "encoder.layer.{i}.output.LayerNorm"}),
    "gpt2": (tiny_gpt2, None, lambda: {**text_inputs(3, 7, seed=3, pad=2), "use_cache": False}, [2], "pre_ln",
             "layer_norm", "sdpa",
             {"q": "h.{i}.attn.c_attn.q", "k": "h.{i}.attn.c_attn.k", "v": "h.{i}.attn.c_attn.v",
              "o": "h.{i}.attn.c_proj", "up": "h.{i}.mlp.c_fc", "down": "h.{i}.mlp.c_proj"},
             {"mh": "h.{i}.ln_1", "output": "h.{i}.ln_2"}),
    "llama": (tiny_llama, None, lambda: {**text_inputs(3, 7, seed=3, pad=2), "use_cache": False}, [2], "pre_ln",
              "rms_norm", "sdpa",
              {"q": "layers.{i}.self_attn.q_proj", "k": "layers.{i}.self_attn.k_proj",
               "v": "layers.{i}.self_attn.v_proj", "o": "layers.{i}.self_attn.o_proj", "up": "layers.{i}.mlp.up_proj",
               "gate": "layers.{i}.mlp.gate_proj", "down": "layers.{i}.mlp.down_proj"},
              {"mh": "layers.{i}.input_layernorm", "output": "layers.{i}.post_attention_layernorm"}),
    "t5": (tiny_t5, None, _t5_new_inputs, [2, 2], "pre_ln", "rms_norm", "eager",
           {"q": "{stack}.block.{i}.layer.0.SelfAttention.q", "k": "{stack}.block.{i}.layer.0.SelfAttention.k",
            "v": "{stack}.block.{i}.layer.0.SelfAttention.v", "o": "{stack}.block.{i}.layer.0.SelfAttention.o",
            "up": "{stack}.block.{i}.layer.{f}.DenseReluDense.wi", "down": "{stack}.block.{i}.layer.{f}.DenseReluDense.wo"},
           {"mh": "{stack}.block.{i}.layer.0.layer_norm", "output": "{stack}.block.{i}.layer.{f}.layer_norm",
            "cross": "decoder.block.{i}.layer.1.layer_norm"}),
    "vit": (tiny_vit, None, lambda: vit_inputs(3, seed=3), [2], "pre_ln", "layer_norm", "sdpa",
            {"q": "encoder.layer.{i}.attention.attention.query", "k": "encoder.layer.{i}.attention.attention.key",
             "v": "encoder.layer.{i}.attention.attention.value", "o": "encoder.layer.{i}.attention.output.dense",
             "up": "encoder.layer.{i}.intermediate.dense", "down": "encoder.layer.{i}.output.dense"},
            {"mh": "encoder.layer.{i}.layernorm_before", "output": "encoder.layer.{i}.layernorm_after"}),
    "bart": (tiny_bart, None, _bart_new_inputs, [2, 2], "post_ln", "layer_norm", "sdpa",
             {"q": "{stack}.layers.{i}.self_attn.q_proj", "k": "{stack}.layers.{i}.self_attn.k_proj",
              "v": "{stack}.layers.{i}.self_attn.v_proj", "o": "{stack}.layers.{i}.self_attn.out_proj",
              "up": "{stack}.layers.{i}.fc1", "down": "{stack}.layers.{i}.fc2"},
             {"mh": "{stack}.layers.{i}.self_attn_layer_norm", "output": "{stack}.layers.{i}.final_layer_norm",
              "cross": "decoder.layers.{i}.encoder_attn_layer_norm"}),
    # called without attention_mask, 4.57's BART drops the mask from encoder and cross SDPA calls
    "bart_nomask": (tiny_bart, _bart_nomask_kwargs(2, 9, 6), lambda: _bart_nomask_kwargs(3, 5, 4, seed=5), [2, 2],
                    "post_ln", "layer_norm", "sdpa", None,
                    {"mh": "{stack}.layers.{i}.self_attn_layer_norm", "output": "{stack}.layers.{i}.final_layer_norm",
                     "cross": "decoder.layers.{i}.encoder_attn_layer_norm"}),
}
CROSS = {  # decoder cross-attention role → path
    "t5": {"q": "decoder.block.{i}.layer.1.EncDecAttention.q", "k": "decoder.block.{i}.layer.1.EncDecAttention.k",
           "v": "decoder.block.{i}.layer.1.EncDecAttention.v", "o": "decoder.block.{i}.layer.1.EncDecAttention.o"},
    "bart": {"q": "decoder.layers.{i}.encoder_attn.q_proj", "k": "decoder.layers.{i}.encoder_attn.k_proj",
             "v": "decoder.layers.{i}.encoder_attn.v_proj", "o": "decoder.layers.{i}.encoder_attn.out_proj"},
}
CROSS["bart_nomask"] = CROSS["bart"]


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            builder, kw = CASES[name][:2]
            model = builder()
            gm = ga.capture(model, example_kwargs=kw)
            cache[name] = (model, gm, recognize(gm))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_recognition(name, captured):
    _, _, _, per_stack, placement, norm_kind, form, roles, norms = CASES[name]
    model, gm, sm = captured(name)
    assert [sum(1 for l in sm.layers if l.stack == s) for s in range(len(per_stack))] == per_stack
    assert len(sm.stacks) == len(per_stack)
    assert not [u for u in sm.unmatched if u.what != "linear"], sm.unmatched
    want_roles = {"q", "k", "v", "o", "up", "down"} | ({"gate"} if name == "llama" else set())
    decoder = len(per_stack) == 2
    for layer in sm.layers:
        stack = ("encoder", "decoder")[layer.stack]
        fmt = dict(i=layer.index_in_stack, stack=stack, f=2 if stack == "decoder" else 1)
        a = layer.attention
        assert a.self_attention and a.form == form, (layer.index, a.form)
        assert a.num_heads == 4
        if form == "eager":
            assert a.softmax is not None and a.core.target == torch.ops.aten.matmul.default
            assert a.softmax in upstream(a.core, 4)
        self_sites = [a.q, a.k, a.v, a.o] + [s for s in (layer.ffn.up, layer.ffn.gate, layer.ffn.down) if s]
        got = {s.role: s.name for s in self_sites}
        assert set(got) == want_roles, got
        assert all(s.layer == layer.index for s in self_sites)
        if roles is not None:
            assert got == {r: t.format(**fmt) for r, t in roles.items()}
        res = layer.residual_sites()
        assert set(res) == ({"mh", "output", "cross"} if decoder and layer.stack == 1 else {"mh", "output"})
        for pos, site in res.items():
            assert site.placement == placement, (layer.index, pos, site.placement)
            norm = site.norm_after if placement == "post_ln" else site.norm_before
            assert norm.kind == norm_kind
            assert norm.weight.rsplit(".", 1)[0] == norms[pos].format(**fmt), (pos, norm.weight)
            assert site.add.args[:2] in ((site.branch, site.stream), (site.stream, site.branch))
        assert a.o.output in upstream(a.residual.branch, 3)
        assert layer.ffn.down.output in upstream(layer.ffn.residual.branch, 3)
        if decoder and layer.stack == 1:
            x = layer.cross_attention
            assert x is not None and not x.self_attention and x.form == form
            assert {r: getattr(x, r).name for r in "qkvo"} == {r: t.format(**fmt) for r, t in CROSS[name].items()}
            # keys/values read the encoder output, queries the decoder stream
            assert x.k.input is x.v.input and x.q.input is not x.k.input
        else:
            assert layer.cross_attention is None


def test_sdpa_without_mask_is_recognised(captured):
    """ViT (always) and mask-less BART call SDPA with only q, k, v; BERT passes its mask."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default

    def masks(name):
        _, gm, _ = captured(name)
        cores = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == sdpa]
        return [len(n.args) > 3 or n.kwargs.get("attn_mask") is not None for n in cores]

    assert masks("vit") == [False, False]
    assert masks("bert") == [True, True]
    # BART without a mask: encoder self and decoder cross attention lose it, decoder self attention keeps causal
    assert masks("bart_nomask").count(False) == 4 and len(masks("bart_nomask")) == 6
    assert all(masks("bart"))
    for name in ("vit", "bart_nomask"):
        _, _, sm = captured(name)
        cores = {l.attention.core for l in sm.layers} | {l.cross_attention.core for l in sm.layers if l.cross_attention}
        assert len(cores) == len(masks(name))


def test_t5_attention_is_eager(captured):
    _, gm, sm = captured("t5")
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    assert sum(1 for l in sm.layers for b in (l.attention, l.cross_attention) if b is not None) == 6
    assert all(b.form == "eager" for l in sm.layers for b in (l.attention, l.cross_attention) if b is not None)


@pytest.mark.parametrize("name", list(CASES))
def test_captured_equals_eager_on_new_shapes(name, captured):
    model, gm, _ = captured(name)
    x = CASES[name][2]()
    with torch.no_grad():
        expected = model(**x).last_hidden_state
        got = gm(**x).last_hidden_state
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_lora_merge_on_eager_t5():
    base = tiny_t5()
    adapted = ga.apply(base, ga.LoRA(r=4, alpha=8, targets=("q", "k", "v", "o", "up", "down")))
    lora = {n: p for n, p in adapted.named_parameters() if n.startswith("adapters.")}
    # every self/cross q k v o plus up/down of all four layers: 2 × (4 + 2) + 2 × (8 + 2)
    assert len({r.target for r in adapted.adapter_records}) == 32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = _t5_new_inputs()
    with torch.no_grad():
        plain = base(**x).last_hidden_state
        unmerged = adapted(**x).last_hidden_state
        report = adapted.merge(strict=True)
        merged = adapted(**x).last_hidden_state
    assert len(report.folded) == 32 and not report.kept
    assert not any(n.op == "call_module" and str(n.target).startswith("adapters.") for n in adapted.graph.nodes)
    assert (unmerged - plain).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=RTOL)
    adapted.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).last_hidden_state, unmerged, atol=0, rtol=0)
