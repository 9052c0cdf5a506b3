"""Tiny, seeded Hugging Face models and inputs for tests (built from configs: no downloads).

Every builder returns an **eval-mode** model whose weights depend only on ``seed``: it is
built under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``, so building a
model never disturbs the calling test's RNG stream. Sizes follow the test convention
(hidden 32, 2 layers, 4 heads, vocab 100); any config field can be overridden by keyword,
e.g. ``tiny_bert(hidden_dropout_prob=0.3)``.

Builders::

    tiny_bert(seed=0, num_labels=None, **cfg)      BertModel, or BertForSequenceClassification
    tiny_roberta(seed=0, num_labels=None, **cfg)   RobertaModel, or RobertaForSequenceClassification
    tiny_gpt2(seed=0, causal_lm=False, **cfg)      GPT2Model (Conv1D, fused c_attn), or GPT2LMHeadModel
    tiny_llama(seed=0, causal_lm=False, **cfg)     LlamaModel (GQA: 4 heads, 2 kv heads), or LlamaForCausalLM
    tiny_t5(seed=0, **cfg)                         T5Model (encoder-decoder)
    tiny_vit(seed=0, **cfg)                        ViTModel (image 16x16, patch 4)

Inputs (own ``torch.Generator``, global RNG untouched)::

    text_inputs(batch, seq, vocab=100, seed=0, pad=0)   {"input_ids", "attention_mask"}
    t5_inputs(batch, seq, dec_seq, vocab=100, seed=0)   + "decoder_input_ids"
    vit_inputs(batch, image_size=16, channels=3, seed=0) {"pixel_values"}

``pad=k`` zeroes the attention mask of the last ``k`` positions of every other example
(right padding, so no query row is fully masked, even in causal models).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers as T
from torch import nn

__all__ = [
    "VOCAB", "HIDDEN", "LAYERS", "HEADS",
    "build_seeded", "tiny_bert", "tiny_roberta", "tiny_gpt2", "tiny_llama", "tiny_t5", "tiny_vit",
    "text_inputs", "t5_inputs", "vit_inputs",
]

VOCAB, HIDDEN, LAYERS, HEADS = 100, 32, 2, 4
INTERMEDIATE = 64
MAX_POS = 64


def build_seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)`` with the caller's RNG forked; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.eval()


def _cfg(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **overrides}


def tiny_bert(seed: int = 0, num_labels: int | None = None, **overrides) -> nn.Module:
    """BertModel (or ``BertForSequenceClassification`` when ``num_labels`` is given)."""
    cfg = T.BertConfig(**_cfg(dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                   max_position_embeddings=MAX_POS, type_vocab_size=2), overrides))
    if num_labels is not None:
        cfg.num_labels = num_labels
        return build_seeded(lambda: T.BertForSequenceClassification(cfg), seed)
    return build_seeded(lambda: T.BertModel(cfg), seed)


def tiny_roberta(seed: int = 0, num_labels: int | None = None, **overrides) -> nn.Module:
    """RobertaModel (or ``RobertaForSequenceClassification`` when ``num_labels`` is given)."""
    cfg = T.RobertaConfig(**_cfg(dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                      max_position_embeddings=MAX_POS + 2, pad_token_id=1,
                                      bos_token_id=0, eos_token_id=2), overrides))
    if num_labels is not None:
        cfg.num_labels = num_labels
        return build_seeded(lambda: T.RobertaForSequenceClassification(cfg), seed)
    return build_seeded(lambda: T.RobertaModel(cfg), seed)


def tiny_gpt2(seed: int = 0, causal_lm: bool = False, **overrides) -> nn.Module:
    """GPT2Model (Conv1D layers, fused ``c_attn``), or ``GPT2LMHeadModel`` with ``causal_lm``."""
    cfg = T.GPT2Config(**_cfg(dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                   n_inner=INTERMEDIATE, n_positions=MAX_POS,
                                   bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1), overrides))
    return build_seeded(lambda: (T.GPT2LMHeadModel if causal_lm else T.GPT2Model)(cfg), seed)


def tiny_llama(seed: int = 0, causal_lm: bool = False, **overrides) -> nn.Module:
    """LlamaModel with grouped-query attention (4 heads, 2 kv heads), or ``LlamaForCausalLM``."""
    cfg = T.LlamaConfig(**_cfg(dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=2,
                                    intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0), overrides))
    return build_seeded(lambda: (T.LlamaForCausalLM if causal_lm else T.LlamaModel)(cfg), seed)


def tiny_t5(seed: int = 0, **overrides) -> nn.Module:
    """T5Model (encoder-decoder; call with ``input_ids``, ``attention_mask``, ``decoder_input_ids``)."""
    cfg = T.T5Config(**_cfg(dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE,
                                 num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), overrides))
    return build_seeded(lambda: T.T5Model(cfg), seed)


def tiny_vit(seed: int = 0, **overrides) -> nn.Module:
    """ViTModel on 16x16 images with 4x4 patches (16 patches + CLS)."""
    cfg = T.ViTConfig(**_cfg(dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=INTERMEDIATE, image_size=16, patch_size=4,
                                  num_channels=3), overrides))
    return build_seeded(lambda: T.ViTModel(cfg), seed)


# --------------------------------------------------------------------------- inputs
def text_inputs(batch: int = 3, seq: int = 5, vocab: int = VOCAB, seed: int = 0,
                pad: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` [batch, seq] (values in [0, vocab)) and an all-ones ``attention_mask``,
    except that with ``pad=k`` the last ``k`` positions of examples 1, 3, … are masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        if not 0 < pad < seq:
            raise ValueError(f"pad must be in (0, seq={seq}), got {pad}")
        mask[1::2, seq - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def t5_inputs(batch: int = 3, seq: int = 5, dec_seq: int = 4, vocab: int = VOCAB,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`text_inputs` plus ``decoder_input_ids`` [batch, dec_seq]."""
    out = text_inputs(batch, seq, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    out["decoder_input_ids"] = torch.randint(0, vocab, (batch, dec_seq), generator=g)
    return out


def vit_inputs(batch: int = 3, image_size: int = 16, channels: int = 3, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``pixel_values`` [batch, channels, image_size, image_size] ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, channels, image_size, image_size, generator=g).to(dtype)}


# --------------------------------------------------------------------------- comparing outputs
def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model output (ModelOutput, tuple or tensor), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in out if isinstance(t, torch.Tensor)]


def max_diff(a, b) -> float:
    """Largest absolute difference over all tensors of two model outputs (in float64)."""
    ta, tb = output_tensors(a), output_tensors(b)
    assert len(ta) == len(tb) and ta, (len(ta), len(tb))
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(ta, tb))


def run_no_grad(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@torch.no_grad()
def perturb_adapters(adapted, seed: int = 0, std: float = 0.1, replace: bool = False) -> None:
    """Seeded ``randn * std`` for every adapter parameter (``adapters.*``): added to it, or in its place."""
    g = torch.Generator().manual_seed(seed)
    for n, p in adapted.named_parameters():
        if n.startswith("adapters.") and p.is_floating_point():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise) if replace else p.add_(noise)


@torch.no_grad()
def randomize_lora(adapted, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero A and B, a perturbed DoRA magnitude and a non-trivial gate on every LoRA module."""
    g = torch.Generator().manual_seed(seed)
    for r in adapted.adapter_records:
        mod = adapted.get_submodule(r.target)
        for p in (mod.lora_A, mod.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        if mod.lora_magnitude is not None:
            mod.lora_magnitude.mul_(0.5 + torch.rand(mod.lora_magnitude.shape, generator=g))
        if mod.gate is not None:
            mod.gate.weight.copy_(torch.randn(mod.gate.weight.shape, generator=g) * 0.5)


def upstream(node, depth: int) -> set:
    """``node`` and every graph node within ``depth`` input hops above it."""
    out, frontier = {node}, [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        out |= set(frontier)
    return out
