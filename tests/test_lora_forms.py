"""AdapterHub's LoRA forms: VeRA / DVoRA, AdapterHub-form DoRA (``LoRA(dora_form="adapterhub")``) and MTL-LoRA,
all in one model: shared frozen projections, training, merge (exact), save/load, spec errors and one ONNX export
verified in onnxruntime. AdapterHub parity: tests/oracle/test_adapterhub_{vera,dora,mtl_lora}_oracle.py."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from helpers import text_inputs, tiny_bert, tiny_llama


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def _randomize(adapted, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _spec():
    return ga.Spec({"v": ga.VeraHub(r=4, magnitude=True, targets=("q", "v")),
                    "d": ga.LoRA(r=2, use_dora=True, dora_form="adapterhub", targets=("up", "down")),
                    "m": ga.MTLLoRA(r=2, n_up_projection=2, weights_sharpness=0.5, targets=("k", "o"))})


def test_train_merge_save_load(tmp_path):
    model, x = tiny_bert(), text_inputs(2, 6, seed=1, pad=2)
    base = _out(model, x)
    adapted = ga.apply(model, _spec())
    torch.testing.assert_close(_out(adapted.eval(), x), base)     # Λ_b = 0 and B = 0 at init: identity
    shared = adapted.get_submodule("adapters.v.shared_vera")
    a0 = shared.proj_A.clone()
    assert not any("shared_vera" in n for n, _ in adapted.named_parameters())   # frozen buffers
    adapted.train()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        adapted(**x).last_hidden_state.pow(2).mean().backward()
        opt.step()
    assert torch.equal(shared.proj_A, a0)
    adapted.eval()
    _randomize(adapted)
    want = _out(adapted, x)
    assert (want - base).abs().max() > 1e-2
    for name in ("v", "d", "m"):                                   # each adapter does something on its own
        adapted.set_active([n for n in ("v", "d", "m") if n != name])
        assert (_out(adapted, x) - want).abs().max() > 1e-3
    adapted.set_active(["v", "d", "m"])
    adapted.save_adapters(tmp_path / "a")
    torch.testing.assert_close(_out(ga.load(tiny_bert(), tmp_path / "a").eval(), x), want)
    adapted.merge()
    torch.testing.assert_close(_out(adapted, x), want, atol=1e-5, rtol=1e-5)


def test_errors_are_clear():
    with pytest.raises(ga.SpecError, match="one shape"):       # q and v differ under grouped-query attention
        ga.apply(tiny_llama(), ga.Spec({"v": ga.VeraHub(targets=("q", "v"))}))
    with pytest.raises(ga.SpecError, match="use_gating"):
        ga.VeraHub(magnitude=True, use_gating=True)
    with pytest.raises(ga.SpecError, match="dora_form"):
        ga.LoRA(use_dora=True, dora_form="nope")
    with pytest.raises(ga.SpecError, match="n_up_projection"):
        ga.MTLLoRA(n_up_projection=0)
    adapted = ga.apply(tiny_bert(), ga.Spec({"d": ga.LoRA(use_dora=True, dora_form="adapterhub")}))
    with pytest.raises(ga.CheckpointError, match="dora_form"):
        adapted.to_peft("/nonexistent/never-written")


def test_onnx_export(tmp_path):
    pytest.importorskip("onnxruntime")
    adapted = ga.apply(tiny_bert(), _spec()).eval()
    _randomize(adapted)
    rep = ga.export_onnx(adapted, tmp_path / "m.onnx", merge=False, example_inputs=text_inputs(2, 5, seed=3, pad=1))
    assert rep.verified and not rep.merged
