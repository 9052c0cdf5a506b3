"""ONNX export of AdaLoRA (unmerged SVD-form factors, non-zero) and P-tuning (the LSTM prompt encoder runs inside the
exported graph): one tiny Llama carrying both, exported once and verified against PyTorch by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga

from helpers import max_diff, text_inputs, tiny_llama


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model = tiny_llama(num_hidden_layers=1)
    spec = ga.Spec({"adalora": ga.AdaLoRA(init_r=4, target_r=2, targets=("q", "v"), total_step=10),
                    "p_tuning": ga.PTuning(prompt_length=3, encoder_type="LSTM", encoder_hidden_size=16)}, seed=2)
    adapted = ga.apply(model, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # AdaLoRA's E starts at zero: make every factor act
        for n, p in adapted.named_parameters():
            if n.startswith("adapters.adalora."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    adapted.eval()
    x = text_inputs(2, 6, pad=2)
    with torch.no_grad():
        outs = {"both": adapted(**x).last_hidden_state}
        for name in spec.adapters:   # each adapter's share: the output without it
            adapted.set_active([n for n in spec.adapters if n != name])
            outs[name] = adapted(**x).last_hidden_state
        adapted.set_active(None)
    rep = ga.export_onnx(adapted, tmp_path_factory.mktemp("extra") / "m.onnx", merge=False, verify=True)
    return adapted, rep, outs


@pytest.mark.parametrize("method", ["adalora", "p_tuning"])
def test_onnx_export_verified(exported, method):
    adapted, rep, outs = exported
    assert rep.verified and not rep.merged and max(rep.max_abs_diff.values()) < 1e-4
    assert {r.method for r in adapted.adapter_records} >= {"adalora", "p_tuning"}
    both = outs["both"]
    assert both.shape[1] == 3 + outs["p_tuning"].shape[1]   # the prompt's positions come first
    assert max_diff(both[:, 3:], outs[method][:, -both.shape[1] + 3:]) > 1e-3   # the exported adapter acts
