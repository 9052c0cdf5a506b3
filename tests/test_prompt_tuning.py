"""Prompt tuning: soft tokens at the input embeddings (graphadapt/methods/prompt, passes/embedding.py).

PEFT parity (PROMPT_TUNING checkpoints on BERT, GPT-2, Llama with padded batches), the output growing by
prompt_length, padding still masked, inactive == base model, gradients reach only the prompt, seeded init,
'from_string' init from embedding rows, save/load, merge keeps it, ONNX export verified in onnxruntime.
AdapterHub parity: tests/oracle/test_adapterhub_prompt_oracle.py.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.errors import SpecError  # noqa: E402
from helpers import text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

P = 3


def _hidden(model, x, **extra):
    with torch.no_grad():
        return model(**x, **extra).last_hidden_state


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_peft_prompt_tuning_import_matches_peft(make, tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = pm.prompt_encoder["default"].embedding.weight
        w.copy_(torch.randn(w.shape, generator=g))
    pm.eval().save_pretrained(tmp_path)
    base = make()
    adapted = ga.import_peft(base, tmp_path).eval()
    spec = adapted.spec.adapters["default"]
    assert spec == ga.PromptTuning(prompt_length=P, insert_at="word_embeddings")
    x = text_inputs(3, 6, pad=2)
    extra = {"use_cache": False} if "use_cache" in adapted.constant_inputs else {}
    want, got, plain = _hidden(pm, x, **extra), _hidden(adapted, x), _hidden(base, x, **extra)
    assert got.shape == want.shape == (3, 6 + P, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[:, P:] - plain).abs().max() > 1e-3  # the prompt changes what the input tokens see


def test_prompt_tokens_mask_activation_gradients_and_checkpoint(tmp_path):
    model = tiny_bert()
    spec = ga.Spec({"p": ga.PromptTuning(prompt_length=P)}, seed=5)
    state = torch.random.get_rng_state()
    adapted = ga.apply(model, spec).eval()
    assert torch.equal(state, torch.random.get_rng_state())  # seeded, isolated init
    again = ga.apply(model, spec)
    prompt = adapted.get_parameter("adapters.p.embeddings.prompt_embeddings")
    assert prompt.shape == (P, 32) and prompt.abs().max() <= 0.5 and prompt.abs().min() > 0
    torch.testing.assert_close(prompt, again.get_parameter("adapters.p.embeddings.prompt_embeddings"), atol=0, rtol=0)
    rec = adapted.adapter_records[0]
    assert len(adapted.adapter_records) == 1 and rec.kind == "embedding" and set(rec.grown_inputs) == {
        "input_ids", "attention_mask"}

    x = text_inputs(3, 7, pad=3)
    out, plain = _hidden(adapted, x), _hidden(model, x)
    assert out.shape == (3, 7 + P, 32) and (out[:, P:] - plain).abs().max() > 1e-3
    # padding is still masked: changing a padded token of example 1 changes nothing at its other positions
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][1, -1] = (y["input_ids"][1, -1] + 1) % 100
    torch.testing.assert_close(_hidden(adapted, y)[1, :-1], out[1, :-1], atol=1e-6, rtol=1e-6)
    # inactive: the graph runs on the original length and is the base model
    adapted.set_active([])
    torch.testing.assert_close(_hidden(adapted, x), plain, atol=1e-6, rtol=1e-6)
    adapted.set_active(None)
    # gradients reach exactly the prompt
    adapted.train()
    adapted(**x).last_hidden_state.sum().backward()
    assert {n for n, p in adapted.named_parameters() if p.grad is not None} == {"adapters.p.embeddings.prompt_embeddings"}
    adapted.eval()
    # merge keeps it (nothing to fold), save/load restores it exactly
    report = adapted.merge()
    assert not report.folded and "adds tokens" in next(iter(report.kept.values()))
    adapted.unmerge()
    adapted.save_adapters(tmp_path / "ckpt")
    loaded = ga.load(tiny_bert(), tmp_path / "ckpt")
    torch.testing.assert_close(_hidden(loaded.eval(), x), out, atol=0, rtol=0)


def test_from_string_init_and_prefix_after_bos():
    model = tiny_bert()
    ids = (5, 17)
    adapted = ga.apply(model, ga.PromptTuning(prompt_length=5, prompt_init="from_string", prompt_init_ids=ids,
                                              combine="prefix_after_bos")).eval()
    rows = model.embeddings.word_embeddings.weight.detach()[[5, 17, 5, 17, 5]]
    torch.testing.assert_close(adapted.get_parameter("adapters.default.embeddings.prompt_embeddings"), rows)
    x = text_inputs(2, 6)
    out = _hidden(adapted, x)
    assert out.shape == (2, 11, 32)
    with pytest.raises(SpecError, match="vocabulary"):
        ga.apply(model, ga.PromptTuning(prompt_init="from_string", prompt_init_ids=[100]))


def test_spec_errors():
    with pytest.raises(SpecError, match="prompt_init_ids") as e:
        ga.PromptTuning(prompt_init="from_string", prompt_init_text="classify")
    assert e.value.field == "prompt_init_ids"
    for bad in (dict(prompt_length=0), dict(combine="suffix"), dict(insert_at="layer"), dict(prompt_init_ids="12"),
                dict(prompt_init_ids=[-1]), dict(random_uniform_scale=0)):
        with pytest.raises(SpecError):
            ga.PromptTuning(**bad)
    s = ga.PromptTuning(prompt_length=4, prompt_init="from_string", prompt_init_ids=[3, 4, 5])
    assert s.init_ids() == (3, 4, 5, 3) and ga.MethodSpec.from_dict(s.to_dict()) == s
    with pytest.raises(SpecError, match="dynamic=True"):
        ga.apply(tiny_bert(), ga.PromptTuning(), dynamic=False)
    with pytest.raises(SpecError, match="Stack/Parallel"):
        ga.plan(tiny_bert(), ga.Spec({"a": ga.PromptTuning(), "b": ga.PromptTuning()}))


def test_prompt_tuned_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    adapted = ga.apply(tiny_llama(), ga.PromptTuning(prompt_length=P, insert_at="word_embeddings"))
    rep = ga.export_onnx(adapted, tmp_path / "m.onnx", verify=True)
    assert rep.verified and max(rep.max_abs_diff.values()) < 1e-4
    # the verification ran on fresh sizes: the output really is P longer than the input
    import onnxruntime as ort

    x = text_inputs(2, 5)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out, *_) = sess.run(None, {k: v.numpy() for k, v in x.items()})
    assert out.shape == (2, 5 + P, 32)
    torch.testing.assert_close(torch.from_numpy(out), _hidden(adapted.eval(), x), atol=1e-4, rtol=1e-4)
