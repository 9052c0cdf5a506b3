"""AdapterHub ``adapters`` 1.3.0 prompt tuning → graphadapt (oracle venv), fp32 1e-5, non-zero prompts.

AdapterHub adds the prompt after the embedding block (input tokens keep positions 0..T-1) and prefixes the mask.
Known difference, by design: with SDPA attention *and* padding AdapterHub prefixes the [B, 1, T, T] mask along
the query axis with "attend" too, so its prompt queries also attend to padding keys (its eager path does not);
graphadapt masks padding for every query. Without padding, or with eager attention, outputs are equal.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import PromptTuningConfig

import graphadapt as ga
from helpers import text_inputs, tiny_bert, tiny_roberta

torch.set_num_threads(1)
P = 3


def _ah(build, attn, **cfg):
    m = build(seed=0, attn_implementation=attn)
    adapters.init(m)
    m.add_adapter("a", config=PromptTuningConfig(prompt_length=P, **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        (w,) = [p for n, p in m.named_parameters() if "prompt_tunings.a." in n]
        w.copy_(torch.randn(w.shape, generator=g))
    m.set_active_adapters("a")
    return m.eval()


def _check(adapted, ah, base, pad):
    x = text_inputs(3, 6, seed=7, pad=pad) if pad else text_inputs(3, 6, seed=7)
    with torch.no_grad():
        want, got, plain = ah(**x).last_hidden_state, adapted.eval()(**x).last_hidden_state, base(**x).last_hidden_state
    assert got.shape == want.shape == (3, 6 + P, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[:, P:] - plain).abs().max() > 1e-3


CASES = {
    "bert-eager-padded": (tiny_bert, "eager", 2, {}),
    "bert-sdpa": (tiny_bert, "sdpa", 0, {}),
    "bert-eager-padded-after-bos": (tiny_bert, "eager", 2, {"combine": "prefix_after_bos"}),
    "roberta-eager-padded": (tiny_roberta, "eager", 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    build, attn, pad, cfg = CASES[case]
    ah = _ah(build, attn, **cfg)
    ah.save_adapter(str(tmp_path), "a")
    base = build(seed=0, attn_implementation=attn)
    adapted = ga.import_adapterhub(base, tmp_path)
    assert adapted.spec.adapters["a"] == ga.PromptTuning(prompt_length=P, insert_at="embedding_output", **cfg)
    _check(adapted, ah, base, pad)


def test_weight_copy():
    ah = _ah(tiny_bert, "eager")
    base = tiny_bert(seed=0, attn_implementation="eager")
    adapted = ga.apply(base, ga.Spec({"a": ga.PromptTuning(prompt_length=P)}))
    with torch.no_grad():
        adapted.get_parameter("adapters.a.embeddings.prompt_embeddings").copy_(
            ah.prompt_tuning.prompt_tunings["a"].prompt_embedding.weight)
    _check(adapted, ah, base, 2)


def test_preset():
    from graphadapt.checkpoints.adapterhub import from_adapterhub_config

    assert from_adapterhub_config("prompt_tuning") == ga.PromptTuning()
    assert from_adapterhub_config(PromptTuningConfig().to_dict()) == ga.PromptTuning()


def test_two_prompts_in_a_block_are_refused_with_adapterhubs_reason(tmp_path):
    """AdapterHub 1.3 composes no prompt-tuning adapters: its PromptTuningLayer runs ``adapter_setup.first()`` only,
    so ``Stack("a", "b")`` there gives ``a`` alone (checked here, non-zero prompts); graphadapt refuses the block
    (SpecError naming that reason) instead of dropping ``b``."""
    m = tiny_bert(seed=0, attn_implementation="eager")
    adapters.init(m)
    g = torch.Generator().manual_seed(1)
    for n in ("a", "b"):
        m.add_adapter(n, config=PromptTuningConfig(prompt_length=P))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "prompt_tunings." in n:
                p.copy_(torch.randn(p.shape, generator=g))
    m.eval()
    x = text_inputs(3, 6, seed=7)
    with torch.no_grad():
        m.set_active_adapters(adapters.Stack("a", "b"))
        stacked = m(**x).last_hidden_state
        m.set_active_adapters("a")
        alone = m(**x).last_hidden_state
        m.set_active_adapters("b")
        other = m(**x).last_hidden_state
    torch.testing.assert_close(stacked, alone, atol=0, rtol=0)
    assert (stacked - other).abs().max() > 1e-3
    spec = {"a": ga.PromptTuning(prompt_length=P, insert_at="embedding_output"),
            "b": ga.PromptTuning(prompt_length=P, insert_at="embedding_output")}
    for block in (ga.Stack("a", "b"), ga.BatchSplit("a", "b", batch_sizes=[1, 2]), ga.Parallel("a", "b")):
        with pytest.raises(ga.SpecError, match="first adapter"):
            ga.apply(tiny_bert(seed=0, attn_implementation="eager"), ga.Spec(spec, active=block))
