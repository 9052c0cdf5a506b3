"""graphadapt.init: RNG isolation, order independence, scheme statistics, PiSSA, helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphadapt.errors import SpecError
from graphadapt.methods.lora import init_lora_
from graphadapt.init import (
    adapter_generator,
    derive_seed,
    init_bert_,
    isolated_rng,
    kaiming_uniform_,
    linear_default_,
    normal_,
    ones_,
    uniform_,
    xavier_uniform_,
    zeros_,
)
from graphadapt.methods.lora import LoRAModule


def _make(scheme="lora", seed=0, name="task", site="layers.0.q", base=None, **kw):
    kw = {"in_features": 32, "out_features": 24, "r": 4, "alpha": 8, **kw}
    m = LoRAModule(**kw)
    init_lora_(m, scheme, adapter_generator(seed, name, site), base_weight=base)
    return m


# --------------------------------------------------------------------------- isolation
def test_global_rng_untouched_by_construction_and_init():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    W = torch.linspace(-1, 1, 24 * 32).reshape(24, 32)  # no RNG
    Wf = torch.linspace(-1, 1, 96 * 32).reshape(32, 96)
    for scheme in ("lora", "gaussian", "bert", "pissa"):
        for flags in ({}, {"use_dora": True}, {"use_rslora": True}, {"dropout": 0.1}):
            _make(scheme, base=W, **flags)
        _make(scheme, base=Wf, out_features=32, out_slice=(32, 64), total_out=96, fan_in_fan_out=True, use_dora=True)
    for scheme in ("lora", "gaussian", "bert"):
        _make(scheme, use_gating=True)
    g = adapter_generator(0, "x", "y")
    t = torch.empty(5, 7)
    for fn in (lambda: normal_(t, 1.0, g), lambda: uniform_(t, -1, 1, g), lambda: kaiming_uniform_(t, 1.0, g),
               lambda: xavier_uniform_(t, g), lambda: init_bert_(t, g), lambda: linear_default_(t, torch.empty(5), g)):
        fn()
    assert torch.equal(torch.get_rng_state(), before)


def test_isolated_rng_restores_state():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with isolated_rng():
        torch.rand(100)
        torch.manual_seed(99)
    assert torch.equal(torch.get_rng_state(), before)


def test_helpers_refuse_missing_generator():
    t = torch.empty(3, 3)
    with pytest.raises(TypeError):
        normal_(t, 1.0, None)
    with pytest.raises(TypeError):
        init_lora_(LoRAModule(4, 4, r=1, alpha=1), "lora", None)


# --------------------------------------------------------------------------- determinism
def test_same_seed_name_site_is_bit_identical_regardless_of_order_and_others():
    a1 = _make(seed=3, name="task", site="layers.1.v")
    # other adapters created in between, different order
    _make(seed=3, name="other", site="layers.1.v")
    _make(seed=3, name="task", site="layers.0.q", use_gating=True)
    torch.rand(10)  # global RNG use must not matter either
    a2 = _make(seed=3, name="task", site="layers.1.v")
    assert a1.lora_A.abs().sum() > 0
    assert torch.equal(a1.lora_A, a2.lora_A) and torch.equal(a1.lora_B, a2.lora_B)


@pytest.mark.parametrize("change", [dict(site="layers.1.k"), dict(name="task2"), dict(seed=4)])
def test_different_site_name_or_seed_differs(change):
    base = dict(seed=3, name="task", site="layers.1.v")
    a = _make(**base)
    b = _make(**{**base, **change})
    assert not torch.equal(a.lora_A, b.lora_A)


def test_derive_seed_is_stable_and_unambiguous():
    # Pinned: changing the hash scheme silently changes every seeded adapter.
    assert derive_seed(0, "task", "layers.0.q") == derive_seed(0, "task", "layers.0.q")
    assert derive_seed(0, "task", "layers.0.q") == 1732117181624431628
    # (name, site) boundaries cannot collide by concatenation
    assert derive_seed(0, "ab", "c") != derive_seed(0, "a", "bc")
    assert 0 <= derive_seed(2**40, "x" * 100, "y") < 2**63


def test_values_do_not_depend_on_target_dtype():
    a = _make(seed=1)
    b = _make(seed=1, dtype=torch.bfloat16)
    c = _make(seed=1, dtype=torch.float64)
    assert torch.equal(b.lora_A, a.lora_A.to(torch.bfloat16))
    assert torch.equal(c.lora_A, a.lora_A.double())


# --------------------------------------------------------------------------- schemes
def test_lora_scheme_is_nn_linear_kaiming_and_zero_b():
    m = _make("lora", seed=2)
    ref = torch.empty(4, 32)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=adapter_generator(2, "task", "layers.0.q"))
    assert torch.equal(m.lora_A, ref)
    assert m.lora_B.abs().sum() == 0
    assert m.lora_A.abs().max() <= 1 / math.sqrt(32)


def test_gaussian_scheme_std_one_over_r():
    m = _make("gaussian", in_features=512, out_features=16, r=16, alpha=16)
    assert m.lora_B.abs().sum() == 0
    assert abs(m.lora_A.std().item() - 1 / 16) < 0.1 / 16
    assert abs(m.lora_A.mean().item()) < 0.01


def test_bert_scheme_both_nonzero_std_002():
    m = _make("bert", in_features=512, out_features=512, r=16, alpha=16)
    for p in (m.lora_A, m.lora_B):
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    assert not torch.equal(m.lora_A[:, :16].t(), m.lora_B[:16])  # separate draws


def test_gate_init_matches_adapterhub_distribution():
    m = _make("lora", in_features=1024, out_features=8, r=2, alpha=2, use_gating=True)
    assert abs(m.gate.weight.std().item() - 0.02) < 0.003
    assert 0 < m.gate.bias.abs().item() <= 1 / math.sqrt(1024)
    # A is drawn first, so gating does not change A for the same (seed, name, site)
    plain = _make("lora", in_features=1024, out_features=8, r=2, alpha=2)
    assert torch.equal(plain.lora_A, m.lora_A)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(use_rslora=True),
        dict(fan_in_fan_out=True),
        dict(out_features=8, out_slice=(8, 16), total_out=24),
        dict(out_features=8, out_slice=(16, 24), total_out=24, fan_in_fan_out=True, use_dora=True),
        dict(use_dora=True),
    ],
)
def test_pissa_reconstructs_base_weight(kw):
    torch.manual_seed(0)
    in_f = 32
    total = kw.get("total_out", kw.get("out_features", 24))
    fifo = kw.get("fan_in_fan_out", False)
    W = torch.randn((in_f, total) if fifo else (total, in_f))
    W_orig = W.clone()
    m = LoRAModule(in_f, kw.pop("out_features", 24), r=4, alpha=8, **kw)
    W_res = init_lora_(m, "pissa", adapter_generator(0, "n", "s"), base_weight=W)
    assert torch.equal(W, W_orig), "the caller's weight must not be modified"
    assert W_res is not None and W_res.shape == W.shape and not torch.allclose(W_res, W, atol=1e-2)
    assert m.lora_B.abs().sum() > 0
    # W_res + s·BA == W: folding onto the residual reconstructs the original
    torch.testing.assert_close(W_res + m.delta_weight(W_res), W, atol=1e-5, rtol=1e-5)
    # the adapted site computes the original function at init (DoRA: magnitude from W_res + s·BA)
    x = torch.randn(2, 3, in_f)
    lin = (lambda w: x @ w) if fifo else (lambda w: F.linear(x, w))
    torch.testing.assert_close(m.eval()(x, lin(W_res), W_res), lin(W), atol=1e-4, rtol=1e-4)
    # rows outside the module's slice are untouched
    if "out_slice" in kw:
        s, e = kw["out_slice"]
        rows_res, rows_w = (W_res.t(), W.t()) if fifo else (W_res, W)
        assert torch.equal(rows_res[:s], rows_w[:s]) and torch.equal(rows_res[e:], rows_w[e:])


def test_pissa_uses_top_singular_directions():
    torch.manual_seed(1)
    W = torch.randn(24, 32)
    m = LoRAModule(32, 24, r=3, alpha=3)
    W_res = init_lora_(m, "pissa", adapter_generator(0, "n", "s"), base_weight=W)
    s_w = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(m.scaling * m.lora_B @ m.lora_A)[:3], s_w[:3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.linalg.svdvals(W_res)[:21], s_w[3:], atol=1e-4, rtol=1e-4)


def test_dora_magnitude_initialised_and_fresh_dora_is_identity():
    torch.manual_seed(2)
    W, b = torch.randn(24, 32), torch.randn(24)
    m = _make("lora", base=W, use_dora=True).eval()
    torch.testing.assert_close(m.lora_magnitude.detach(), W.norm(dim=1))
    x = torch.randn(2, 5, 32)
    y = F.linear(x, W, b)
    torch.testing.assert_close(m(x, y, W, b), y, atol=1e-6, rtol=1e-6)
    # bert init: B != 0, the magnitude includes s·BA so the norm ratio is still 1
    mb = _make("bert", base=W, use_dora=True).eval()
    torch.testing.assert_close(mb.lora_magnitude.detach(), (W + mb.delta_weight()).norm(dim=1))


def test_bad_init_requests():
    m = LoRAModule(8, 8, r=2, alpha=2)
    g = adapter_generator(0, "n", "s")
    with pytest.raises(SpecError):
        init_lora_(m, "kaiming", g)
    with pytest.raises(SpecError):
        init_lora_(m, "pissa", g)  # needs base_weight
    with pytest.raises(SpecError):
        init_lora_(LoRAModule(8, 8, r=2, alpha=2, use_dora=True), "lora", g)  # needs base_weight
    with pytest.raises(SpecError):
        init_lora_(LoRAModule(8, 8, r=2, alpha=2, use_gating=True), "pissa", g, base_weight=torch.randn(8, 8))
    with pytest.raises(SpecError):
        init_lora_(LoRAModule(8, 4, r=6, alpha=2), "pissa", g, base_weight=torch.randn(4, 8))


# --------------------------------------------------------------------------- helpers
def test_linear_default_matches_nn_linear():
    with isolated_rng():
        torch.manual_seed(11)
        lin = nn.Linear(20, 7)
    w, b = torch.empty(7, 20), torch.empty(7)
    g = torch.Generator().manual_seed(11)
    linear_default_(w, b, g)
    assert torch.equal(w, lin.weight.detach()) and torch.equal(b, lin.bias.detach())


def test_small_helpers():
    g = adapter_generator(0, "h", "s")
    t = torch.empty(200, 300)
    xavier_uniform_(t, g)
    bound = math.sqrt(6 / 500)
    assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    uniform_(t, 2.0, 3.0, g)
    assert t.min() >= 2.0 and t.max() <= 3.0
    normal_(t, 0.5, g, mean=1.0)
    assert abs(t.mean().item() - 1.0) < 0.01 and abs(t.std().item() - 0.5) < 0.01
    assert zeros_(t).abs().sum() == 0 and ones_(t).sum() == t.numel()
    p = nn.Parameter(torch.zeros(3, 4))
    init_bert_(p, g)  # works on leaf parameters that require grad
    assert p.requires_grad and p.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_pissa_matches_peft(use_dora):
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 24)

        def forward(self, x):
            return self.lin(x)

    with isolated_rng():
        torch.manual_seed(3)
        tiny = Tiny()
        W = tiny.lin.weight.detach().clone()
        pm = get_peft_model(tiny, LoraConfig(target_modules=["lin"], r=4, lora_alpha=8, init_lora_weights="pissa", use_dora=use_dora))
    layer = pm.base_model.model.lin
    m = LoRAModule(32, 24, r=4, alpha=8, use_dora=use_dora)
    W_res = init_lora_(m, "pissa", adapter_generator(0, "n", "s"), base_weight=W)
    torch.testing.assert_close(m.lora_A.detach(), layer.lora_A["default"].weight.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.lora_B.detach(), layer.lora_B["default"].weight.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(W_res, layer.base_layer.weight.detach(), atol=1e-6, rtol=1e-5)
    if use_dora:
        torch.testing.assert_close(m.lora_magnitude.detach(), layer.lora_magnitude_vector["default"].weight.detach(), atol=1e-5, rtol=1e-5)
