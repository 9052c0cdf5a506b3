"""Issue #14 breadth: head-interleaved fused QKV (GPT-NeoX, Falcon, Bloom), Whisper-style audio
inputs synthesised from the config, DeBERTa-v2's disentangled attention.

For the interleaved projections the reference is hand-built from each model's own layout (not
from what recognition found): a LoRA on q must equal adding ``s·B@A`` to q's rows of the fused
weight in the original Hugging Face model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

import graphadapt as ga
from graphadapt.structure import recognize

from helpers import build_seeded, max_diff, text_inputs

H, NH, D, FF, V, L = 32, 4, 8, 64, 100, 1   # one layer: the check is per layer


def _rows(blocks, width=D):
    """Channel indices of ``blocks`` (head-block numbers, in head order) of ``width`` each."""
    return [b * width + d for b in blocks for d in range(width)]


# name: (builder, path of the fused weight in layer i, {role: rows} from the model's own view layout)
INTERLEAVED = {
    # view(…, heads, 3·D) → chunk(3): head h holds [q_h | k_h | v_h]
    "gpt-neox": (lambda: T.GPTNeoXModel(T.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                        num_attention_heads=NH, intermediate_size=FF)),
                 "layers.{}.attention.query_key_value.weight",
                 {r: _rows([3 * h + i for h in range(NH)]) for i, r in enumerate("qkv")}),
    # view(…, heads, 3, D) → select
    "bloom": (lambda: T.BloomModel(T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=L, n_head=NH)),
              "h.{}.self_attention.query_key_value.weight",
              {r: _rows([3 * h + i for h in range(NH)]) for i, r in enumerate("qkv")}),
    # new decoder architecture, GQA: view(…, kv_heads=2, q_per_kv + 2 = 4, D) → slice / index / broadcast_to
    "falcon-gqa": (lambda: T.FalconModel(T.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                        num_attention_heads=NH, new_decoder_architecture=True,
                                                        num_kv_heads=2)),
                   "h.{}.self_attention.query_key_value.weight",
                   {"q": _rows([0, 1, 4, 5]), "k": _rows([2, 6]), "v": _rows([3, 7])}),
    # (Falcon's multi-query form, view(…, heads + 2, D), is in tests/test_architectures.py)
}


@pytest.mark.parametrize("name", list(INTERLEAVED))
def test_lora_on_q_changes_exactly_q_rows_of_the_fused_weight(name):
    make, wpath, expected = INTERLEAVED[name]
    model = build_seeded(make)
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets=("q",)))
    sm = recognize(ga.capture(model))
    for layer in sm.layers:
        a = layer.attention
        assert {r: list(s.out_rows) for r, s in (("q", a.q), ("k", a.k), ("v", a.v))} == expected
    x = {k: v for k, v in text_inputs(3, 6, pad=2).items() if k in adapted.input_names}
    with torch.no_grad():
        base = model(**x)
        assert max_diff(adapted(**x), base) == 0.0          # identity at init, bit-exact
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        y = adapted(**x)
    assert max_diff(y, base) > 1e-3

    # hand-built reference: s·B@A added to q's rows (the model's own layout) of the HF weight
    ref = build_seeded(make)
    rows = torch.tensor(expected["q"])
    with torch.no_grad():
        for i in range(L):
            mod = adapted.get_submodule(f"adapters.default.{wpath.format(i).rsplit('.', 1)[0]}.q")
            w = ref.get_parameter(wpath.format(i))
            w[rows] += mod.scaling * mod.lora_B @ mod.lora_A
        assert max_diff(ref(**x), y) < 1e-5

    w0 = {i: adapted.get_parameter(wpath.format(i)).detach().clone() for i in range(L)}
    adapted.merge()
    assert max_diff(adapted(**x), y) < 1e-5
    others = torch.tensor(sorted(set(range(w0[0].shape[0])) - set(expected["q"])))
    for i in range(L):
        merged = adapted.get_parameter(wpath.format(i)).detach()
        assert torch.equal(merged[others], w0[i][others])                     # only q's rows change
        torch.testing.assert_close(merged, ref.get_parameter(wpath.format(i)).detach(), atol=1e-6, rtol=0)
    adapted.unmerge()
    assert max_diff(adapted(**x), y) == 0.0


@pytest.fixture(scope="module")
def neox():
    return build_seeded(INTERLEAVED["gpt-neox"][0])


def test_peft_parity_on_the_whole_fused_projection(neox, tmp_path):
    """PEFT cannot target q's rows of ``query_key_value``; LoRA on the whole projection matches it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build_seeded(INTERLEAVED["gpt-neox"][0]),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(tmp_path)
    adapted = ga.import_peft(neox, tmp_path)
    assert {r.site for r in adapted.adapter_records} == {f"layers.{i}.attention.query_key_value" for i in range(L)}
    x = text_inputs(3, 6, pad=2)
    with torch.no_grad():
        assert max_diff(adapted(**x), pm(**x)) < 1e-5
        assert max_diff(adapted(**x), neox(**x)) > 1e-3


def test_ia3_on_interleaved_k_v_merges(neox):
    adapted = ga.apply(neox, ga.IA3(targets=("k", "v"), feedforward=()))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("ia3_l"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    x = text_inputs(3, 6, pad=2)
    with torch.no_grad():
        y = adapted(**x)
    assert max_diff(y, neox(**x)) > 1e-3
    q_rows = torch.tensor(INTERLEAVED["gpt-neox"][2]["q"])
    w0 = adapted.get_parameter("layers.0.attention.query_key_value.weight").detach().clone()
    adapted.merge()
    assert max_diff(adapted(**x), y) < 1e-5
    assert torch.equal(adapted.get_parameter("layers.0.attention.query_key_value.weight").detach()[q_rows], w0[q_rows])


# --------------------------------------------------------------------------- audio
def _identity_then_exact_merge(model, adapted, x, g):
    """Fresh adapters change nothing; with random LoRA B / bottleneck up they do, and merging the
    LoRA keeps the output (the bottleneck stays in the graph). Returns the adapted output."""
    with torch.no_grad():
        base = model(**x)
        assert max_diff(adapted(**x), base) == 0.0
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B") or n.endswith("adapter_up.weight"):
                p.normal_(0, 0.2, generator=g)
        y = adapted(**x)
    assert max_diff(y, base) > 1e-3
    adapted.merge()
    assert max_diff(adapted(**x), y) < 1e-5
    adapted.unmerge()
    return y


def test_whisper_applies_without_example_inputs_and_exports(tmp_path):
    cfg = T.WhisperConfig(vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=NH,
                          decoder_attention_heads=NH, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_mel_bins=8,
                          max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, decoder_start_token_id=1)
    model = build_seeded(lambda: T.WhisperModel(cfg))
    adapted = ga.apply(model, ga.Spec({"l": ga.LoRA(r=4, targets=("q", "v")),
                                       "b": ga.SeqBn(reduction_factor=4, init_weights="mam_adapter")}))
    assert {"input_features", "decoder_input_ids"} <= set(adapted.input_names)
    assert [r.role for r in adapted.adapter_records if r.adapter == "l"].count("q") == 1 + 1 * 2   # + cross
    g = torch.Generator().manual_seed(3)
    x = {"input_features": torch.randn(3, 8, 32, generator=g),
         "decoder_input_ids": torch.randint(0, V, (3, 5), generator=g)}
    _identity_then_exact_merge(model, adapted, x, g)
    report = ga.export_onnx(adapted, tmp_path / "whisper.onnx")
    assert report.verified


# --------------------------------------------------------------------------- DeBERTa-v2
def _deberta():
    return build_seeded(lambda: T.DebertaV2Model(T.DebertaV2Config(
        vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
        max_position_embeddings=64, relative_attention=True, position_buckets=16, max_relative_positions=32,
        pos_att_type=["p2c", "c2p"], share_att_key=True)))


def test_deberta_v2_recognised_with_lora_bottleneck_and_peft_parity(tmp_path):
    model = _deberta()
    sm = recognize(ga.capture(model))
    assert len(sm.layers) == L
    for layer in sm.layers:
        assert {s.role for s in layer.linear_sites()} == {"q", "k", "v", "o", "up", "down"}
        assert {k: r.placement for k, r in layer.residual_sites().items()} == {"mh": "post_ln", "output": "post_ln"}
        assert layer.attention.form == "eager"

    adapted = ga.apply(model, ga.Spec({"l": ga.LoRA(r=4, targets=("q", "k", "v")),
                                       "b": ga.SeqBn(reduction_factor=4, init_weights="mam_adapter")}))
    # share_att_key: query_proj/key_proj also project the relative positions; those uses are adapted too
    assert len([r for r in adapted.adapter_records if r.adapter == "l"]) == L * (3 + 2)
    x = text_inputs(3, 6, pad=2)
    g = torch.Generator().manual_seed(4)
    y = _identity_then_exact_merge(model, adapted, x, g)
    assert max_diff(adapted(**x), y) == 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_deberta(), LoraConfig(r=4, lora_alpha=8, target_modules=["query_proj", "key_proj",
                                                                                     "value_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(tmp_path)
    imported = ga.import_peft(_deberta(), tmp_path)
    with torch.no_grad():
        assert max_diff(imported(**x), pm(**x)) < 1e-5


# --------------------------------------------------------------------------- modules on an index set
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "ia3-ff"])
def test_index_set_module_forward_fold_and_other_channels(kind):
    from graphadapt.methods.ia3 import IA3Module
    from graphadapt.methods.lora import LoRAModule

    rows, total = (7, 1, 4, 9), 10
    g = torch.Generator().manual_seed(5)
    if kind in ("lora", "dora"):
        m = LoRAModule(6, 4, r=2, alpha=4, out_rows=rows, total_out=total, use_dora=kind == "dora")
        with torch.no_grad():
            m.lora_A.normal_(generator=g)
            m.lora_B.normal_(generator=g)
            if kind == "dora":
                m.lora_magnitude.uniform_(0.5, 2.0, generator=g)
    else:
        m = IA3Module(6, 4, feedforward=kind == "ia3-ff", out_rows=rows, total_out=total)
        with torch.no_grad():
            m.ia3_l.uniform_(0.5, 1.5, generator=g)
    m.eval()
    W, b, x = torch.randn(total, 6, generator=g), torch.randn(total, generator=g), torch.randn(2, 3, 6, generator=g)
    y = torch.nn.functional.linear(x, W, b)
    out = m(x, y, W, b)
    others = [c for c in range(total) if c not in rows]
    assert torch.equal(out[..., others], y[..., others]) and not torch.allclose(out[..., list(rows)], y[..., list(rows)])
    # the module on rows == the same module on a plain site holding those rows in that order
    if kind in ("lora", "dora"):
        plain = LoRAModule(6, 4, r=2, alpha=4, use_dora=kind == "dora")
    else:
        plain = IA3Module(6, 4, feedforward=kind == "ia3-ff")
    plain.load_state_dict(m.state_dict())
    idx = torch.tensor(rows)
    torch.testing.assert_close(out[..., idx], plain.eval()(x, y[..., idx], W[idx], b[idx]), atol=1e-6, rtol=0)
    W2, b2 = m.fold(W, b)
    torch.testing.assert_close(torch.nn.functional.linear(x, W2, b2), out, atol=1e-5, rtol=0)
    assert torch.equal(W2[others], W[others]) and torch.equal(b2[others], b[others])
    if kind == "lora":
        torch.testing.assert_close(W + m.delta_weight(W), W2, atol=1e-6, rtol=0)


def test_index_set_validation():
    from graphadapt.methods.lora import LoRAModule

    for bad in ((0, 0, 1), (0, 1, 99), (0, 1)):
        with pytest.raises(ga.SpecError, match="out_rows"):
            LoRAModule(6, 3, r=2, alpha=4, out_rows=bad, total_out=8)
    assert LoRAModule(6, 3, r=2, alpha=4, out_rows=(2, 3, 4), total_out=8).out_slice == (2, 5)   # contiguous: a slice
