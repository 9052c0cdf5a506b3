"""P-tuning: the prompt encoder (MLP or LSTM) computes PEFT's prompt from PEFT's encoder weights; PEFT's saved
P-tuning checkpoints (the encoder's output) import with PEFT's outputs; the encoder trains."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model

import graphadapt as ga

from helpers import max_diff, text_inputs, tiny_llama

P = 3


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_equals_peft_and_imports(encoder, tmp_path):
    cfg = PromptEncoderConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, encoder_hidden_size=16,
                              encoder_reparameterization_type=encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), cfg)
    ours = ga.apply(tiny_llama(), ga.PTuning(prompt_length=P, encoder_type=encoder, encoder_hidden_size=16))
    mod = ours.get_submodule(ours.adapter_records[0].target)
    enc = pm.prompt_encoder["default"]
    theirs = {"virtual_tokens": enc.embedding.weight, **{f"mlp_head.{k}": v for k, v in enc.mlp_head.named_parameters()},
              **({f"lstm_head.{k}": v for k, v in enc.lstm_head.named_parameters()} if encoder == "LSTM" else {})}
    mine = dict(mod.named_parameters())
    assert set(mine) == set(theirs)
    with torch.no_grad():
        for k, v in theirs.items():
            mine[k].copy_(v)
    x = text_inputs(3, 6, pad=2)
    pm.eval()
    ours.eval()
    with torch.no_grad():
        want = pm(**x, use_cache=False).last_hidden_state
        got = ours(**x).last_hidden_state
        plain = tiny_llama()(**x, use_cache=False).last_hidden_state
    assert got.shape == want.shape == (3, 6 + P, 32)
    assert max_diff(got, want) < 1e-5 and max_diff(got[:, P:], plain) > 1e-3
    # the encoder trains: gradients reach its weights, not the base
    ours.train()
    ours(**x).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in mod.mlp_head.parameters())
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("adapters."))
    # PEFT saves the encoder's output: it imports as prompt tuning with PEFT's outputs
    pm.save_pretrained(tmp_path)
    imported = ga.import_peft(tiny_llama(), tmp_path)
    assert isinstance(imported.spec.adapters["default"], ga.PromptTuning)
    with torch.no_grad():
        assert max_diff(imported(**x).last_hidden_state, want) < 1e-5


def test_p_tuning_spec_errors_and_seeded_init():
    with pytest.raises(ga.SpecError, match="encoder_type"):
        ga.PTuning(encoder_type="GRU")
    state = torch.random.get_rng_state()
    a = ga.apply(tiny_llama(), ga.Spec({"p": ga.PTuning(prompt_length=P, encoder_type="LSTM")}, seed=3))
    assert torch.equal(state, torch.random.get_rng_state())   # drawn from the adapter's own generator
    mod = a.get_submodule(a.adapter_records[0].target)
    from graphadapt.init import adapter_generator

    want = torch.empty(P, 32).normal_(0.0, 1.0, generator=adapter_generator(3, "p", a.adapter_records[0].site))
    assert torch.equal(mod.virtual_tokens.detach(), want)   # seeded: the first draw of the site's generator
