"""Invertible adapters (NICE coupling block at the embedding output): placement, exact inverse, training, save/load
inside a bottleneck union. ONNX export: tests/test_reft.py's shared export. AdapterHub parity:
tests/oracle/test_adapterhub_invertible_oracle.py."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.vocab import SiteKind
from helpers import text_inputs, tiny_gpt2


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def test_union_with_a_bottleneck_trains_saves_and_loads(tmp_path):
    model, x = tiny_gpt2(), text_inputs(2, 6, seed=1, pad=2)
    base = _out(model, x)
    spec = ga.Spec({"a": ga.Union(ga.SeqBn(reduction_factor=4), ga.InvertibleAdapter(non_linearity="tanh"))})
    adapted = ga.apply(model, spec)
    inv = next(r for r in adapted.adapter_records if r.member == "invertible")
    assert inv.kind == SiteKind.HIDDEN and inv.role == "embedding_output"
    coupling = adapted.get_submodule(inv.target)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(coupling.inverse(coupling(h)), h, atol=1e-6, rtol=0)   # NICE inverts exactly
    adapted.train()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    before = coupling.F[2].weight.detach().clone()
    adapted(**x).last_hidden_state.pow(2).mean().backward()
    assert coupling.G[0].weight.grad.abs().max() > 0
    opt.step()
    assert (coupling.F[2].weight - before).abs().max() > 0
    adapted.eval()
    want = _out(adapted, x)
    assert (want - base).abs().max() > 1e-3
    coupling.active = False                          # the coupling alone changes the output
    assert (_out(adapted, x) - want).abs().max() > 1e-4
    coupling.active = True
    adapted.save_adapters(tmp_path / "a")
    torch.testing.assert_close(_out(ga.load(tiny_gpt2(), tmp_path / "a").eval(), x), want)


def test_bad_specs_are_clear():
    with pytest.raises(ga.SpecError, match="block"):
        ga.InvertibleAdapter(block="glow")
    with pytest.raises(ga.SpecError, match="reduction_factor"):
        ga.InvertibleAdapter(reduction_factor=0)
