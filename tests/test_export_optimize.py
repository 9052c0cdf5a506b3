"""Fusable exports (``export_onnx(optimize="ort")``) and tokenizer-ready exports (token_type_ids).

One export per model and setting, shared by module fixtures (each export costs seconds)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.errors import ExportError
from graphadapt.exporters import export_onnx
from graphadapt.exporters import _model
from graphadapt.exporters.fusion import ATTENTION_OPS, fused_op_counts

from helpers import LAYERS, perturb_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta

ort = pytest.importorskip("onnxruntime")


def _lora(model):
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8))
    perturb_adapters(adapted, seed=3)  # non-zero B: the adapters change the output
    return adapted


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tokenizer(tmp_path_factory):
    """A real BERT tokenizer (WordPiece over a 30-token vocabulary, ids < tiny_bert's 100)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran",
             "graph", "adapt", "fast", "##s", "is", "it", "?", ".", "yes", "no", "and", "or", "big", "small", "red",
             "blue", "green"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return T.BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def bert_cls():
    return _lora(tiny_bert(num_labels=3))


@pytest.fixture(scope="module")
def bert_exports(bert_cls, tmp_path_factory):
    """{setting: (path, report)} for the LoRA BERT classifier: default, and optimize='ort' merged/unmerged."""
    out = tmp_path_factory.mktemp("bert")
    exports = {}
    for name, kwargs in {"default": {}, "ort-merged": dict(optimize="ort"),
                         "ort-unmerged": dict(optimize="ort", merge=False)}.items():
        path = out / f"{name}.onnx"
        exports[name] = path, export_onnx(bert_cls, path, **kwargs)
    return exports


def _msft_ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == "com.microsoft"]


@pytest.mark.parametrize("setting", ["ort-merged", "ort-unmerged"])
def test_bert_export_fuses_every_attention(bert_exports, setting):
    path, rep = bert_exports[setting]
    assert rep.optimize == "ort" and rep.verified and rep.merged == (setting == "ort-merged")
    # one fused attention per layer, and the optimizer's own fusions around them; merged, q/k/v are plain
    # projections, packed into one GEMM (Attention); unmerged, each also has its LoRA branch (MultiHeadAttention)
    assert sum(rep.fused_ops.get(op, 0) for op in ATTENTION_OPS) == LAYERS
    assert rep.fused_ops["Attention" if setting == "ort-merged" else "MultiHeadAttention"] == LAYERS
    assert rep.fused_ops["SkipLayerNormalization"] == 2 * LAYERS and rep.fused_ops["BiasGelu"] == LAYERS
    assert rep.fused_ops == fused_op_counts(path)
    assert "Softmax" not in rep.op_histogram  # no unfused attention left
    assert max(rep.max_abs_diff.values()) <= 1e-5  # the optimized file itself was verified
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["graphadapt.optimize"] == "ort"
    assert "optimize='ort': fused" in rep.summary()


def test_unmerged_export_keeps_the_adapter_branches(bert_exports):
    merged, unmerged = bert_exports["ort-merged"][1], bert_exports["ort-unmerged"][1]
    assert unmerged.op_histogram["MatMul"] > merged.op_histogram["MatMul"]


def test_default_export_is_standard_onnx(bert_exports):
    path, rep = bert_exports["default"]
    assert rep.optimize is None and rep.fused_ops == {} and rep.verified
    assert _msft_ops(path) == []


@pytest.mark.parametrize("setting", ["default", "ort-merged", "ort-unmerged"])
def test_tokenizer_output_feeds_the_session_unchanged(bert_exports, bert_cls, tokenizer, setting):
    path, rep = bert_exports[setting]
    assert rep.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert rep.dynamic_axes["token_type_ids"] == {0: "batch", 1: "sequence"}
    enc = tokenizer(["the cat sat on a mat", "a dog ran"], ["is it red ?", "yes ."], padding=True, return_tensors="np")
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"} and enc["token_type_ids"].any()
    (logits,) = _session(path).run(["logits"], dict(enc))
    with torch.no_grad():
        ref = bert_cls(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
        no_segments = bert_cls(**{k: torch.from_numpy(v) for k, v in enc.items() if k != "token_type_ids"}).logits
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-4)
    # the token types are live in the graph: dropping them changes the logits
    assert np.abs(no_segments.numpy() - ref).max() > 1e-4


def test_export_follows_the_adapters(bert_exports, tokenizer):
    """The verified file computes the adapted model, not the base model."""
    enc = dict(tokenizer(["the cat sat"], ["yes"], return_tensors="np"))
    base = tiny_bert(num_labels=3)
    with torch.no_grad():
        base_logits = base(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    (logits,) = _session(bert_exports["ort-unmerged"][0]).run(["logits"], enc)
    assert np.abs(logits - base_logits).max() > 1e-4


def test_llama_unmerged_lora_fuses_every_attention(tmp_path):
    """Rotary embeddings, grouped-query attention (4 query heads over 2 key/value heads) and a causal mask."""
    adapted = _lora(tiny_llama(causal_lm=True))
    rep = export_onnx(adapted, tmp_path / "llama.onnx", optimize="ort", merge=False)
    assert rep.verified and not rep.merged and max(rep.max_abs_diff.values()) <= 1e-5
    assert rep.fused_ops["MultiHeadAttention"] == LAYERS
    assert rep.fused_ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert "Softmax" not in rep.op_histogram
    assert "token_type_ids" not in rep.input_names


class _AttentionForms(torch.nn.Module):
    """Every SDPA form the translation handles: causal without a mask, grouped-query heads with a
    float mask, a 2-D boolean mask, default scale and a custom one."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.kv = torch.nn.Linear(16, 8)

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 4).transpose(1, 2)
        kv = self.kv(x).view(b, s, 2, 4).transpose(1, 2)  # 2 key/value heads
        k, v = kv * 0.5, kv + 1.0
        sdpa = torch.nn.functional.scaled_dot_product_attention
        causal = sdpa(q, q, q, is_causal=True)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4  # float mask, [B, 1, 1, L]
        grouped = sdpa(q, k, v, attn_mask=bias, enable_gqa=True, scale=0.3)
        keep = torch.ones(s, s, dtype=torch.bool).tril()  # 2-D boolean mask
        plain = sdpa(q, q * 2.0, q, attn_mask=keep)
        return causal + grouped + plain


def test_translation_covers_every_sdpa_form(tmp_path):
    model = _AttentionForms().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    rep = export_onnx(model, tmp_path / "forms.onnx", example_inputs={"x": x, "attention_mask": mask},
                      optimize="ort")
    # sdpa(q, q, q) reads one projection three times: packed; the others read scaled/shifted values: not
    assert rep.fused_ops["MultiHeadAttention"] == 2 and rep.fused_ops["Attention"] == 1
    assert "Softmax" not in rep.op_histogram
    assert rep.verified and max(rep.max_abs_diff.values()) <= 1e-5
    mha = [n for n in onnx.load(str(tmp_path / "forms.onnx")).graph.node
           if n.op_type in ("MultiHeadAttention", "Attention")]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in mha]
    assert sorted(a.get("unidirectional", 0) for a in attrs) == [0, 0, 1]
    assert any(abs(a.get("scale", 0) - 0.3) < 1e-7 for a in attrs)


def test_optimize_value_is_checked_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="optimize must be one of"):
        export_onnx(tiny_bert(), tmp_path / "m.onnx", optimize="fast")
    assert list(tmp_path.iterdir()) == []


def test_token_type_ids_only_where_the_tokenizer_returns_them():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with_types = _model.with_tokenizer_inputs(tiny_bert(), base)
    assert with_types["token_type_ids"].shape == ids.shape and set(with_types["token_type_ids"].unique().tolist()) == {0, 1}
    assert "token_type_ids" not in _model.with_tokenizer_inputs(tiny_roberta(), base)  # RobertaTokenizer: none
    assert "token_type_ids" not in _model.with_tokenizer_inputs(tiny_gpt2(), base)  # GPT2Tokenizer: none
    given = {**base, "token_type_ids": torch.zeros_like(ids)}
    assert _model.with_tokenizer_inputs(tiny_bert(), given) is given
