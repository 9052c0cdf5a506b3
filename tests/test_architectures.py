"""Breadth: recognition and LoRA on architectures beyond the core table.

Each row says what a reader of the architecture would expect; recognition uses the graph only.
Architectures whose q/k/v come from a head-interleaved fused projection (GPT-NeoX, Bloom, Falcon)
get q/k/v as per-role index sets of the fused channels (``out_rows``; tests/test_fused_rows.py
checks the rows and the merged weights).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.structure import recognize

from helpers import build_seeded, max_diff, text_inputs

H, L, NH, FF, V = 32, 2, 4, 64, 100
QKV = {"q", "k", "v", "o", "up", "down"}

# name: (builder, roles per layer, placement, stacks, cross-attention layers)
ARCHS = {
    "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF)),
                   QKV, "post_ln", 1, 0),
    "albert": (lambda: T.AlbertModel(T.AlbertConfig(vocab_size=V, embedding_size=16, hidden_size=H, num_hidden_layers=L,
                                                    num_attention_heads=NH, intermediate_size=FF)), QKV, "post_ln", 1, 0),
    "electra": (lambda: T.ElectraModel(T.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=H, num_hidden_layers=L,
                                                       num_attention_heads=NH, intermediate_size=FF)), QKV, "post_ln", 1, 0),
    "bart": (lambda: T.BartModel(T.BartConfig(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L,
                                              encoder_attention_heads=NH, decoder_attention_heads=NH,
                                              encoder_ffn_dim=FF, decoder_ffn_dim=FF)), QKV, "post_ln", 2, 2),
    "mbart": (lambda: T.MBartModel(T.MBartConfig(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L,
                                                 encoder_attention_heads=NH, decoder_attention_heads=NH,
                                                 encoder_ffn_dim=FF, decoder_ffn_dim=FF)), QKV, "pre_ln", 2, 2),
    "mistral": (lambda: T.MistralModel(T.MistralConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                                       num_key_value_heads=2, intermediate_size=FF)),
                QKV | {"gate"}, "pre_ln", 1, 0),
    "qwen2": (lambda: T.Qwen2Model(T.Qwen2Config(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                                 num_key_value_heads=2, intermediate_size=FF)), QKV | {"gate"}, "pre_ln", 1, 0),
    "gemma": (lambda: T.GemmaModel(T.GemmaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                                 num_key_value_heads=2, intermediate_size=FF, head_dim=8)),
              QKV | {"gate"}, "pre_ln", 1, 0),
    "phi3": (lambda: T.Phi3Model(T.Phi3Config(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                              intermediate_size=FF, pad_token_id=0)), QKV | {"gate"}, "pre_ln", 1, 0),
    "opt": (lambda: T.OPTModel(T.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                           ffn_dim=FF, word_embed_proj_dim=H)), QKV, "pre_ln", 1, 0),
    "phi (parallel)": (lambda: T.PhiModel(T.PhiConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                                                      intermediate_size=FF)), QKV, "pre_ln", 1, 0),
    "gptj (parallel)": (lambda: T.GPTJModel(T.GPTJConfig(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, rotary_dim=4,
                                                         bos_token_id=V - 1, eos_token_id=V - 1)), QKV, "pre_ln", 1, 0),
    "gpt-neox (interleaved qkv)": (lambda: T.GPTNeoXModel(T.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                                        num_attention_heads=NH, intermediate_size=FF)),
                                   QKV, "pre_ln", 1, 0),
    "bloom (interleaved qkv)": (lambda: T.BloomModel(T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=L, n_head=NH)),
                                QKV, "pre_ln", 1, 0),
    "falcon (interleaved qkv, parallel)": (lambda: T.FalconModel(T.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                                                 num_attention_heads=NH)),
                                           QKV, "pre_ln", 1, 0),
    "mt5": (lambda: T.MT5Model(T.MT5Config(vocab_size=V, d_model=H, d_ff=FF, num_layers=L, num_heads=NH, d_kv=8,
                                           decoder_start_token_id=0)), QKV, "pre_ln", 2, 2),
    "clip-text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                           num_attention_heads=NH, intermediate_size=FF,
                                                           bos_token_id=0, eos_token_id=2)), QKV, "pre_ln", 1, 0),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_recognised_and_lora_applies(name):
    make, roles, placement, stacks, cross = ARCHS[name]
    model = build_seeded(make)
    gm = ga.capture(model)
    sm = recognize(gm)
    assert len(sm.stacks) == stacks
    assert sum(1 for layer in sm.layers if layer.cross_attention) == cross
    for layer in sm.layers:
        got = [s.role for s in layer.linear_sites()
               if layer.cross_attention is None or s not in (layer.cross_attention.q, layer.cross_attention.k,
                                                             layer.cross_attention.v, layer.cross_attention.o)]
        assert len(got) == len(set(got)), f"a role assigned twice: {got}"
        assert set(got) == roles
        res = layer.residual_sites()
        assert res["mh"].placement == placement and res["output"].placement == placement
    if "interleaved" in name:
        for layer in sm.layers:
            a = layer.attention
            assert all(s.out_rows is not None for s in (a.q, a.k, a.v))
            assert a.q.weight == a.k.weight == a.v.weight
    if "parallel" in name:
        assert all(layer.attention.residual.parallel_with is not None for layer in sm.layers)

    # LoRA on every recognised role changes the output, merges exactly, and unmerges bit-exactly
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=tuple(sorted(roles))))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)
    kw = {k: v for k, v in text_inputs(3, 6).items() if k in adapted.input_names}
    for k in adapted.input_names:
        kw.setdefault(k, text_inputs(3, 4, seed=1)["input_ids"])  # decoder_input_ids
    base = gm(**kw)
    y = adapted(**kw)
    assert max_diff(y, base) > 1e-3
    adapted.merge()
    assert max_diff(adapted(**kw), y) < 1e-5
    adapted.unmerge()
    assert max_diff(adapted(**kw), y) == 0.0


def test_bottleneck_refuses_parallel_blocks():
    model = build_seeded(ARCHS["phi (parallel)"][0])
    with pytest.raises(ga.SpecError, match="parallel attention"):
        ga.apply(model, ga.SeqBn(reduction_factor=4))


def test_shared_layer_weights_share_their_adapters():
    """ALBERT runs one layer's weights at every depth: one adapter module, called at each use."""
    model = build_seeded(ARCHS["albert"][0])
    adapted = ga.apply(model, ga.Spec({"l": ga.LoRA(r=4, targets=("q", "v")),
                                       "b": ga.SeqBn(reduction_factor=4, init_weights="mam_adapter")}))
    calls = [str(n.target) for n in adapted.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
    assert len(calls) == 3 * 2 and len(set(calls)) == 3  # q, v, output adapter; each used by both layers
    assert len({r.target for r in adapted.adapter_records}) == 3
