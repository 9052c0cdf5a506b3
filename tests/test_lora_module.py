"""LoRAModule against PEFT (plain, rsLoRA, DoRA, Conv1D layout, chaining, merge) and
against a hand-written AdapterHub-style gated reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from graphadapt.errors import MergeError, SpecError
from graphadapt.methods.lora import LoRAModule


class _Tiny(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _base(kind: str, in_f: int, out_f: int, bias: bool = True) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_f, out_f, bias=bias)
    layer = Conv1D(out_f, in_f)  # weight [in, out]
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    if not bias:
        layer.bias = None
    return layer


def _base_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Conv1D):
        out = x @ layer.weight
        return out if layer.bias is None else out + layer.bias
    return layer(x)


def _peft(base: nn.Module, adapters: dict[str, dict]):
    """PEFT model on ``base`` with the named adapters (kwargs of LoraConfig), all active,
    random non-zero A/B (and DoRA magnitudes). Returns (peft_model, lora layer)."""
    fifo = isinstance(base, Conv1D)
    names = list(adapters)
    pm = get_peft_model(
        _Tiny(base), LoraConfig(target_modules=["lin"], fan_in_fan_out=fifo, **adapters[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        pm.add_adapter(name, LoraConfig(target_modules=["lin"], fan_in_fan_out=fifo, **adapters[name]))
    layer = pm.base_model.model.lin
    layer.set_adapter(names)
    with torch.no_grad():
        for name in names:
            layer.lora_A[name].weight.normal_(0, 0.3)
            layer.lora_B[name].weight.normal_(0, 0.3)
            if name in layer.lora_magnitude_vector:
                mag = layer.lora_magnitude_vector[name].weight
                mag.mul_(1 + 0.3 * torch.rand_like(mag))
    return pm, layer


def _ours_from_peft(layer, name: str, **extra) -> LoRAModule:
    base = layer.base_layer
    fifo = isinstance(base, Conv1D)
    in_f, out_f = (base.weight.shape if fifo else base.weight.shape[::-1])
    cfg = layer.lora_dropout[name]
    m = LoRAModule(
        in_f,
        out_f,
        r=layer.r[name],
        alpha=layer.lora_alpha[name],
        dropout=cfg.p if isinstance(cfg, nn.Dropout) else 0.0,
        use_rslora=layer.use_rslora[name],
        use_dora=layer.use_dora[name],
        fan_in_fan_out=fifo,
        **extra,
    )
    with torch.no_grad():
        m.lora_A.copy_(layer.lora_A[name].weight)
        m.lora_B.copy_(layer.lora_B[name].weight)
        if m.use_dora:
            m.lora_magnitude.copy_(layer.lora_magnitude_vector[name].weight)
    return m


def _wb(layer):
    base = layer.base_layer
    return base.weight, base.bias


# --------------------------------------------------------------------------- PEFT parity
CASES = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
}


# transformers' Conv1D always has a bias, so conv1d is tested with bias only
@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_peft(case, bias, kind):
    torch.manual_seed(0)
    pm, layer = _peft(_base(kind, 12, 10, bias=bias), {"one": CASES[case]})
    pm.eval()
    m = _ours_from_peft(layer, "one").eval()
    W, b = _wb(layer)
    x = torch.randn(3, 5, 12)
    y0 = _base_out(layer.base_layer, x)
    expected = pm(x)
    got = m(x, y0, W, b)
    assert not torch.allclose(got, y0, atol=1e-3), "adapter must change the output"
    # plain/rsLoRA run the same ops as PEFT; DoRA's norm is computed via B@A instead of
    # PEFT's lora_B(lora_A(eye)), so allow fp32 rounding there.
    tol = 1e-5 if case == "dora" else 1e-6
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_scaling_values():
    assert LoRAModule(4, 4, r=8, alpha=16).scaling == 2.0
    assert LoRAModule(4, 4, r=8, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))
    torch.manual_seed(0)
    _, layer = _peft(nn.Linear(4, 4), {"one": dict(r=8, lora_alpha=16, use_rslora=True)})
    assert _ours_from_peft(layer, "one").scaling == layer.scaling["one"]


@pytest.mark.parametrize("case", ["plain", "dora"])
def test_train_mode_dropout_matches_peft(case):
    """Same dropout mask (same global seed before each call): PEFT's DoRA recomputes the base
    term from W·dropout(x) when dropout is active in training; ours must too."""
    torch.manual_seed(1)
    cfg = dict(CASES[case], lora_dropout=0.3)
    pm, layer = _peft(nn.Linear(12, 10), {"one": cfg})
    pm.train()
    m = _ours_from_peft(layer, "one").train()
    W, b = _wb(layer)
    x = torch.randn(3, 5, 12)
    y0 = _base_out(layer.base_layer, x)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        expected = pm(x)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        got = m(x, y0, W, b)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # eval removes the dropout: different from the train output
    assert not torch.allclose(m.eval()(x, y0, W, b), got, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_peft(case):
    """Including DoRA's detached norm: gradients of A, B and m equal PEFT's."""
    torch.manual_seed(2)
    pm, layer = _peft(nn.Linear(12, 10), {"one": CASES[case]})
    pm.eval()
    m = _ours_from_peft(layer, "one").eval()
    W, b = _wb(layer)
    x = torch.randn(3, 5, 12)
    target = torch.randn(3, 5, 10)
    ((pm(x) - target) ** 2).sum().backward()
    ((m(x, _base_out(layer.base_layer, x).detach(), W.detach(), b.detach()) - target) ** 2).sum().backward()
    torch.testing.assert_close(m.lora_A.grad, layer.lora_A["one"].weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.lora_B.grad, layer.lora_B["one"].weight.grad, atol=1e-5, rtol=1e-4)
    if m.use_dora:
        torch.testing.assert_close(m.lora_magnitude.grad, layer.lora_magnitude_vector["one"].weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("pair", [("plain", "rslora"), ("dora", "dora"), ("plain", "dora"), ("dora", "plain")])
def test_chained_matches_peft_multi_adapter(pair, kind):
    """y2 = m2(x, m1(x, y0, W, b), W, b) equals PEFT with both adapters active (eval);
    for DoRA that means m2 rescales m1's contribution too (PEFT's result-based base term)."""
    torch.manual_seed(3)
    pm, layer = _peft(_base(kind, 12, 10), {"one": CASES[pair[0]], "two": CASES[pair[1]]})
    pm.eval()
    m1, m2 = _ours_from_peft(layer, "one").eval(), _ours_from_peft(layer, "two").eval()
    W, b = _wb(layer)
    x = torch.randn(2, 6, 12)
    y0 = _base_out(layer.base_layer, x)
    got = m2(x, m1(x, y0, W, b), W, b)
    torch.testing.assert_close(got, pm(x), atol=1e-5, rtol=1e-5)

    # Sequential fold with the original base weight for the DoRA norm == PEFT merge == forward.
    W1, b1 = m1.fold(W, b, base_weight=W)
    W2, b2 = m2.fold(W1, b1, base_weight=W)
    folded = x @ W2 + b2 if kind == "conv1d" else F.linear(x, W2, b2)
    torch.testing.assert_close(folded, got, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), W2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("case", list(CASES))
def test_fold_and_delta_match_peft(case, kind):
    torch.manual_seed(4)
    pm, layer = _peft(_base(kind, 12, 10), {"one": CASES[case]})
    m = _ours_from_peft(layer, "one").eval()
    W, b = _wb(layer)
    if not m.use_dora:
        torch.testing.assert_close(m.delta_weight(W), layer.get_delta_weight("one"), atol=1e-6, rtol=1e-6)
    W_f, b_f = m.fold(W, b)
    layer.merge()
    torch.testing.assert_close(W_f, layer.base_layer.weight.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b_f, layer.base_layer.bias.detach())


# --------------------------------------------------------------------------- fold vs forward
def _random_module(**kw) -> LoRAModule:
    m = LoRAModule(**kw)
    with torch.no_grad():
        m.lora_A.normal_(0, 0.3)
        m.lora_B.normal_(0, 0.3)
        if m.use_dora:
            m.lora_magnitude.uniform_(0.5, 2.0)
        if m.gate is not None:
            m.gate.weight.normal_(0, 0.3)
            m.gate.bias.normal_(0, 0.3)
    return m.eval()


def _linear(x, W, b, fifo):
    out = x @ W if fifo else x @ W.t()
    return out if b is None else out + b


FOLD_CASES = [
    dict(in_features=12, out_features=10, r=4, alpha=8),
    dict(in_features=12, out_features=10, r=4, alpha=8, use_rslora=True),
    dict(in_features=12, out_features=10, r=4, alpha=8, use_dora=True),
    dict(in_features=12, out_features=10, r=4, alpha=8, fan_in_fan_out=True),
    dict(in_features=12, out_features=10, r=4, alpha=8, use_dora=True, fan_in_fan_out=True),
    dict(in_features=12, out_features=8, r=4, alpha=8, out_slice=(8, 16), total_out=24),
    dict(in_features=12, out_features=8, r=4, alpha=8, out_slice=(8, 16), total_out=24, use_dora=True),
    dict(in_features=12, out_features=8, r=4, alpha=8, out_slice=(16, 24), total_out=24, fan_in_fan_out=True),
    dict(in_features=12, out_features=8, r=4, alpha=8, out_slice=(0, 8), total_out=24, use_dora=True, fan_in_fan_out=True),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kw", FOLD_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items() if k not in ("in_features", "r", "alpha")))
def test_fold_equals_forward(kw, bias):
    torch.manual_seed(5)
    m = _random_module(**kw)
    total = kw.get("total_out", kw["out_features"])
    fifo = kw.get("fan_in_fan_out", False)
    W = torch.randn((kw["in_features"], total) if fifo else (total, kw["in_features"])) * 0.3
    b = torch.randn(total) if bias else None
    W_copy, b_copy = W.clone(), (None if b is None else b.clone())
    x = torch.randn(2, 5, kw["in_features"])
    y0 = _linear(x, W, b, fifo)
    out = m(x, y0, W, b)
    assert not torch.allclose(out, y0, atol=1e-3)
    W_f, b_f = m.fold(W, b)
    torch.testing.assert_close(_linear(x, W_f, b_f, fifo), out, atol=1e-5, rtol=1e-5)
    # inputs untouched, outputs are new tensors of the full fused shape
    assert torch.equal(W, W_copy) and W_f.shape == W.shape and W_f.data_ptr() != W.data_ptr()
    if b is not None:
        assert torch.equal(b, b_copy) and b_f.data_ptr() != b.data_ptr() and torch.equal(b_f, b)
    else:
        assert b_f is None
    if not m.use_dora:
        torch.testing.assert_close(W_f, W + m.delta_weight(W))


def test_fold_output_is_detached():
    m = _random_module(in_features=6, out_features=4, r=2, alpha=2)
    W = torch.randn(4, 6, requires_grad=True)
    W_f, _ = m.fold(W, None)
    assert not W_f.requires_grad


# --------------------------------------------------------------------------- fused slices
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("fifo", [False, True])
def test_slice_touches_only_its_channels_and_matches_unsliced(use_dora, fifo):
    """A module on [h, 2h) of a 3h-wide fused projection == the same module on a standalone
    linear holding rows [h, 2h); the other channels stay bit-identical."""
    torch.manual_seed(6)
    h, d = 8, 12
    m = _random_module(in_features=d, out_features=h, r=4, alpha=8, use_dora=use_dora,
                       fan_in_fan_out=fifo, out_slice=(h, 2 * h), total_out=3 * h)
    W = torch.randn((d, 3 * h) if fifo else (3 * h, d)) * 0.3
    b = torch.randn(3 * h)
    x = torch.randn(2, 5, d)
    y0 = _linear(x, W, b, fifo)
    out = m(x, y0, W, b)
    assert torch.equal(out[..., :h], y0[..., :h]) and torch.equal(out[..., 2 * h :], y0[..., 2 * h :])
    assert not torch.allclose(out[..., h : 2 * h], y0[..., h : 2 * h], atol=1e-3)

    ref = LoRAModule(d, h, r=4, alpha=8, use_dora=use_dora, fan_in_fan_out=fifo).eval()
    ref.load_state_dict(m.state_dict())
    W_s = W[:, h : 2 * h] if fifo else W[h : 2 * h]
    ref_out = ref(x, y0[..., h : 2 * h], W_s, b[h : 2 * h])
    torch.testing.assert_close(out[..., h : 2 * h], ref_out, atol=1e-6, rtol=1e-6)

    delta = m.delta_weight()
    rows = delta.t() if fifo else delta
    assert rows[:h].abs().sum() == 0 and rows[2 * h :].abs().sum() == 0 and rows[h : 2 * h].abs().sum() > 0

    W_f, _ = m.fold(W, b)
    rows_f, rows_0 = (W_f.t(), W.t()) if fifo else (W_f, W)
    assert torch.equal(rows_f[:h], rows_0[:h]) and torch.equal(rows_f[2 * h :], rows_0[2 * h :])


def test_slice_dora_matches_peft_on_sliced_linear():
    torch.manual_seed(7)
    h, d = 6, 10
    fused = nn.Linear(d, 3 * h)
    part = nn.Linear(d, h)
    with torch.no_grad():
        part.weight.copy_(fused.weight[2 * h :])
        part.bias.copy_(fused.bias[2 * h :])
    pm, layer = _peft(part, {"one": CASES["dora"]})
    pm.eval()
    m = LoRAModule(d, h, r=4, alpha=8, use_dora=True, out_slice=(2 * h, 3 * h), total_out=3 * h).eval()
    with torch.no_grad():
        m.lora_A.copy_(layer.lora_A["one"].weight)
        m.lora_B.copy_(layer.lora_B["one"].weight)
        m.lora_magnitude.copy_(layer.lora_magnitude_vector["one"].weight)
    x = torch.randn(2, 4, d)
    out = m(x, fused(x), fused.weight, fused.bias)
    torch.testing.assert_close(out[..., 2 * h :], pm(x), atol=1e-5, rtol=1e-5)


def test_leading_dims_are_free():
    m = _random_module(in_features=6, out_features=4, r=2, alpha=2)
    W, b = torch.randn(4, 6), torch.randn(4)
    for shape in [(6,), (3, 6), (2, 3, 6), (2, 3, 4, 6)]:
        x = torch.randn(*shape)
        y = F.linear(x, W, b)
        out = m(x, y, W, b)
        assert out.shape == y.shape
        torch.testing.assert_close(out, F.linear(x, *m.fold(W, b)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gating
def _adapterhub_gated_reference(m: LoRAModule, x, y):
    """AdapterHub LoRA.forward with use_gating, composed by LoRALinear (scaling=1.0):
    h = dropout(x) @ A^T @ B^T; gate = mean(sigmoid(gate(x)), dim=1).unsqueeze(-1); y + h * gate."""
    h = m.dropout(x) @ m.lora_A.t() @ m.lora_B.t()
    gate = torch.sigmoid(x @ m.gate.weight.t() + m.gate.bias)
    gate = torch.mean(gate, dim=1).unsqueeze(-1)
    return y + h * gate


def test_gated_matches_adapterhub_formula():
    torch.manual_seed(8)
    m = _random_module(in_features=12, out_features=10, r=4, alpha=64, use_gating=True)
    W, b = torch.randn(10, 12), torch.randn(10)
    x = torch.randn(3, 7, 12)
    y = F.linear(x, W, b)
    out = m(x, y, W, b)
    torch.testing.assert_close(out, _adapterhub_gated_reference(m, x, y), atol=1e-6, rtol=1e-6)
    # the gate replaces the scaling (alpha=64 ⇒ s=16 would be a large difference)
    h = F.linear(F.linear(x, m.lora_A), m.lora_B)
    assert not torch.allclose(out, y + m.scaling * h * m.gate_value(x), atol=1e-3)
    # one gate per example: [B, 1, 1], values in (0, 1), different examples differ
    g = m.gate_value(x)
    assert g.shape == (3, 1, 1) and ((g > 0) & (g < 1)).all() and g.unique().numel() == 3


def test_gated_2d_input_treats_dim0_as_batch():
    torch.manual_seed(9)
    m = _random_module(in_features=12, out_features=10, r=4, alpha=8, use_gating=True)
    W, b = torch.randn(10, 12), torch.randn(10)
    x = torch.randn(5, 12)
    y = F.linear(x, W, b)
    out = m(x, y, W, b)
    torch.testing.assert_close(out, _adapterhub_gated_reference(m, x, y), atol=1e-6, rtol=1e-6)
    assert m.gate_value(x).shape == (5, 1)
    # per-row gate equals the 3-D gate of a length-1 sequence
    torch.testing.assert_close(out, m(x[:, None], y[:, None], W, b)[:, 0], atol=1e-6, rtol=1e-6)


def test_gated_slice_and_not_mergeable():
    torch.manual_seed(10)
    m = _random_module(in_features=8, out_features=4, r=2, alpha=4, use_gating=True, out_slice=(4, 8), total_out=12)
    W, b = torch.randn(12, 8), torch.randn(12)
    x = torch.randn(2, 3, 8)
    y = F.linear(x, W, b)
    out = m(x, y, W, b)
    torch.testing.assert_close(out[..., 4:8], _adapterhub_gated_reference(m, x, y[..., 4:8]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[..., :4], y[..., :4]) and torch.equal(out[..., 8:], y[..., 8:])
    assert m.mergeable is False and _random_module(in_features=8, out_features=4, r=2, alpha=4).mergeable
    with pytest.raises(MergeError, match="gate"):
        m.fold(W, b)
    with pytest.raises(MergeError):
        m.delta_weight()
    assert set(dict(m.named_parameters())) == {"lora_A", "lora_B", "gate.weight", "gate.bias"}


# --------------------------------------------------------------------------- construction
def test_construction_is_zero_and_param_layout():
    m = LoRAModule(12, 10, r=4, alpha=8, use_dora=True, dtype=torch.float64)
    assert m.lora_A.shape == (4, 12) and m.lora_B.shape == (10, 4) and m.lora_magnitude.shape == (10,)
    assert m.lora_A.dtype == torch.float64
    assert all(p.abs().sum() == 0 for p in m.parameters())
    assert set(m.state_dict()) == {"lora_A", "lora_B", "lora_magnitude"}
    assert "use_dora=True" in repr(m) and "scaling=2" in repr(m)
    s = LoRAModule(12, 8, r=2, alpha=2, out_slice=(8, 16), total_out=24, dropout=0.1)
    assert "out_slice=(8, 16)" in repr(s) and "dropout=0.1" in repr(s)
    assert isinstance(LoRAModule(4, 4, r=1, alpha=1).dropout, nn.Identity)


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=0),
        dict(r=2, dropout=1.0),
        dict(r=2, use_dora=True, use_gating=True),
        dict(r=2, out_slice=(0, 4)),  # no total_out
        dict(r=2, out_slice=(0, 3), total_out=12),  # width != out_features
        dict(r=2, out_slice=(10, 14), total_out=12),
        dict(r=2, total_out=12),
    ],
)
def test_bad_arguments_raise_spec_error(kw):
    kw.setdefault("alpha", 1)
    with pytest.raises(SpecError):
        LoRAModule(8, 4, **kw)


def test_dtype_of_result_follows_y():
    torch.manual_seed(11)
    m = _random_module(in_features=6, out_features=4, r=2, alpha=2)  # fp32 adapter
    W, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = F.linear(x, W, b)
    out = m(x, y, W, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(x, *m.fold(W, b)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(out_features=24),
        dict(out_features=8, use_dora=True, out_slice=(8, 16), total_out=24, fan_in_fan_out=True),
        dict(out_features=8, use_gating=True, out_slice=(0, 8), total_out=24),
    ],
)
def test_torch_export_with_dynamic_batch_and_seq(kw):
    """The insert pass's graphs are re-exported for ONNX: the module must trace with
    symbolic batch/sequence sizes and no data-dependent control flow."""
    from torch.export import Dim, export

    class Site(nn.Module):
        def __init__(self, m, fifo):
            super().__init__()
            self.W = nn.Parameter(torch.randn((16, 24) if fifo else (24, 16)))
            self.b = nn.Parameter(torch.randn(24))
            self.m, self.fifo = m, fifo

        def forward(self, x):
            return self.m(x, _linear(x, self.W, self.b, self.fifo), self.W, self.b)

    torch.manual_seed(12)
    site = Site(_random_module(in_features=16, r=2, alpha=4, **kw), kw.get("fan_in_fan_out", False)).eval()
    ep = export(site, (torch.randn(2, 5, 16),), dynamic_shapes={"x": {0: Dim("b"), 1: Dim("s")}}, strict=False)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ep.module()(x), site(x))
