"""Weight-delta methods (wave 4: LoHa, LoKr, VeRA, FourierFT, SHiRA, C3A, …): each imported from a PEFT checkpoint
with non-zero adapter weights gives PEFT's outputs (fp32, 1e-5), merges exactly, saves/loads, starts seeded, and
exports to ONNX (one shared export of a model carrying every method)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import graphadapt as ga
from graphadapt import import_peft
from graphadapt.methods import get_method

from helpers import max_diff, text_inputs, tiny_bert, tiny_gpt2, tiny_llama

# (method, model builder, PEFT config, std of the noise put on PEFT's adapter tensors)
CASES = {
    "loha-bert": ("loha", tiny_bert, lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["query", "value", "dense"]),
                  0.3),
    "loha-llama": ("loha", tiny_llama, lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]),
                   0.3),
}


def _peft_checkpoint(make, cfg, std, tmp_path):
    """A PEFT model whose trainable adapter tensors are replaced by seeded noise (zero-init factors included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.eval().save_pretrained(tmp_path)
    return pm


def _call(model, adapted, x):
    extra = {"use_cache": False} if "use_cache" in adapted.constant_inputs else {}
    with torch.no_grad():
        return model(**x, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_import_matches_and_merges(case, tmp_path):
    method, make, cfg, std = CASES[case]
    pm = _peft_checkpoint(make, cfg(), std, tmp_path)
    base = make()
    adapted = import_peft(base, tmp_path).eval()
    assert {r.method for r in adapted.adapter_records} == {method}
    x = text_inputs(2, 6, pad=2)
    ref, got, plain = _call(pm, adapted, x), _call(adapted, adapted, x), _call(base, adapted, x)
    assert max_diff(got, ref) < 1e-5
    assert max_diff(got, plain) > 1e-3  # the adapter does something
    report = adapted.merge()
    assert not report.kept and len(report.folded) == len(adapted.adapter_records)
    assert not [n for n in adapted.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
    assert max_diff(_call(adapted, adapted, x), got) < 1e-5
    adapted.unmerge()
    assert max_diff(_call(adapted, adapted, x), got) == 0


# graphadapt-native specs: (spec class kwargs giving a non-identity init)
NATIVE = {
    "loha": dict(r=2, init_weights=False),
}


def _spec(method, **kw):
    return get_method(method).spec_class(**kw)


@pytest.mark.parametrize("method", list(NATIVE))
def test_native_seeded_identity_save_load(method, tmp_path):
    model, x = tiny_bert(), text_inputs(2, 5)
    plain = _call(model, model_adapted := ga.apply(model, ga.Spec({"a": _spec(method, targets=("q", "v"))})), x)
    if getattr(model_adapted.spec.adapters["a"], "init_weights", True) is True:
        assert max_diff(_call(model_adapted, model_adapted, x), plain) == 0  # the default init is the identity
    spec = _spec(method, targets=("q", "v"), **NATIVE[method])
    one = ga.apply(model, ga.Spec({"a": spec}, seed=1))
    two = ga.apply(model, ga.Spec({"a": spec}, seed=1))
    other = ga.apply(model, ga.Spec({"a": spec}, seed=2))
    s1, s2, s3 = (dict(m.named_parameters()) for m in (one, two, other))
    ours = [n for n in s1 if n.startswith("adapters.")]
    assert ours and all(torch.equal(s1[n], s2[n]) for n in ours)
    assert any(not torch.equal(s1[n], s3[n]) for n in ours)
    out = _call(one, one, x)
    assert max_diff(out, plain) > 1e-4
    # gradients reach the adapter's trainable tensors
    one.train()
    one(**x).last_hidden_state.sum().backward()
    assert all(p.grad is not None for n, p in one.named_parameters() if n.startswith("adapters.") and p.requires_grad)
    one.eval()
    one.save_adapters(tmp_path / "ckpt")
    again = ga.load(tiny_bert(), tmp_path / "ckpt").eval()
    assert max_diff(_call(again, again, x), out) == 0
