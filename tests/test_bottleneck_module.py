"""graphadapt.methods.bottleneck (module, phm): init, identity, RNG isolation, checkpoints, export (main venv).

Numerical parity with AdapterHub lives in tests/oracle/test_bottleneck_module_oracle.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.bottleneck.module import (
    ACTIVATIONS,
    BottleneckAdapter,
    adapterhub_key_map,
    kwargs_from_adapterhub_config,
    load_adapterhub_state_dict,
)
from graphadapt.methods.bottleneck.phm import PHMConfig, PHMLinear, init_shared_phm_parameters, kronecker_sum

H = 64
INITS = ["bert", "mam_adapter", "houlsby"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make(phm=False, shared_rule=True, shared_W=False, factor_W=True, init="bert", seed=0, **kw):
    """A module plus, for PHM with sharing, its caller-owned shared dict (built from the same generator)."""
    g = gen(seed)
    shared = None
    phm_kw = {}
    if phm:
        phm_kw = dict(shared_phm_rule=shared_rule, shared_W_phm=shared_W, factorized_phm_W=factor_W)
        cfg = PHMConfig(**phm_kw)
        if cfg.uses_shared:
            shared = init_shared_phm_parameters(H, H // kw.get("reduction_factor", 4), cfg, generator=g,
                                                init_weights=init)  # fmt: skip
    kw.setdefault("reduction_factor", 4)
    m = BottleneckAdapter(H, init_weights=init, phm_layer=phm, shared=shared, generator=g, **phm_kw, **kw)
    return m, shared


def data(seed=0):
    g = gen(100 + seed)
    h, r = torch.randn(2, 5, H, generator=g), torch.randn(2, 5, H, generator=g)
    w, b = 1 + 0.1 * torch.randn(H, generator=g), 0.1 * torch.randn(H, generator=g)
    return h, r, w, b


def base_output(h, r, w, b, norm_kind, eps=1e-12):
    x = h + r
    if norm_kind == "layer_norm":
        return F.layer_norm(x, (H,), w, b, eps)
    if norm_kind == "rms_norm":
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) + b
    return x


# Structures whose output is exactly the un-adapted sub-block when the adapter branch outputs zero.
IDENTITY_STRUCTURES = [
    dict(),  # Pfeiffer / SeqBn
    dict(original_ln_before=False),  # Houlsby / DoubleSeqBn
    dict(original_ln_before=False, residual_before_ln=False),
    dict(original_ln_before=True, residual_before_ln=False, original_ln_after=False),  # AdapterPlus
    dict(is_parallel=True),  # ParBn
    dict(is_parallel=True, scaling=4.0),
]


@pytest.mark.parametrize("norm_kind", ["layer_norm", None, "rms_norm"])
@pytest.mark.parametrize("structure", range(len(IDENTITY_STRUCTURES)))
@pytest.mark.parametrize("phm,shared_W,factor_W", [(False, False, True), (True, False, True), (True, True, True),
                                                   (True, False, False), (True, True, False)])  # fmt: skip
def test_mam_adapter_is_identity_at_init_and_trains(structure, norm_kind, phm, shared_W, factor_W):
    kw = dict(IDENTITY_STRUCTURES[structure], use_gating=structure % 2 == 0, scaling=2.0)
    kw.update(IDENTITY_STRUCTURES[structure])
    m, shared = make(phm=phm, shared_W=shared_W, factor_W=factor_W, init="mam_adapter", norm_kind=norm_kind, **kw)
    h, r, w, b = data()
    out = m(h, r, w, b)
    assert torch.equal(out, base_output(h, r, w, b, norm_kind)) or torch.allclose(
        out, base_output(h, r, w, b, norm_kind), atol=1e-6, rtol=0
    )
    # The zero up projection still receives gradient (zero-init B / W_right, not a dead branch).
    out.pow(2).sum().backward()
    if phm:
        up_w = shared["W_up_right" if factor_W else "W_up"] if shared_W else m.adapter_up.own_weight_factors()[-1]
    else:
        up_w = m.adapter_up.weight
    assert up_w.grad is not None and up_w.grad.abs().sum() > 0


@pytest.mark.parametrize("norm_kind", ["layer_norm", None])
@pytest.mark.parametrize("phm", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_nonzero_weights_change_output(norm_kind, phm, parallel):
    m, shared = make(phm=phm, init="mam_adapter", norm_kind=norm_kind, is_parallel=parallel)
    h, r, w, b = data()
    before = m(h, r, w, b)
    with torch.no_grad():
        for p in m.adapter_up.parameters():
            p.normal_(0, 0.3, generator=gen(5))
    after = m(h, r, w, b)
    assert not torch.allclose(before, after, atol=1e-3)


def _rng_states():
    return torch.get_rng_state().clone()


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("ln_before", [False, True])
@pytest.mark.parametrize("phm", [False, True])
def test_init_schemes_initialise_the_right_tensors(init, ln_before, phm):
    for gating, parallel in itertools.product([False, True], repeat=2):
        state = _rng_states()
        m, shared = make(phm=phm, shared_rule=False, init=init, ln_before=ln_before, use_gating=gating,
                         is_parallel=parallel, ln_after=True, scaling="channel")  # fmt: skip
        assert torch.equal(state, torch.get_rng_state()), "construction + init touched the global RNG"
        h, r, w, b = data()
        assert m(h, r, w, b).isfinite().all()
        # New LayerNorms and scaling are never the tensors a scheme randomises.
        for norm in [m.adapter_norm_after] + ([m.adapter_norm_before] if ln_before else []):
            assert torch.equal(norm.weight, torch.ones(H)) and torch.equal(norm.bias, torch.zeros(H))
        assert torch.equal(m.scaling, torch.ones(H))
        down, up = m.adapter_down, m.adapter_up
        assert torch.equal(down.bias, torch.zeros_like(down.bias))
        assert torch.equal(up.bias, torch.zeros_like(up.bias))
        if not phm:
            dw, uw = down.weight, up.weight
            assert dw.abs().sum() > 0
            if init == "bert":
                assert 0.015 < dw.std() < 0.025 and 0.015 < uw.std() < 0.025
            elif init == "mam_adapter":
                assert dw.abs().max() <= 1 / H**0.5 and dw.std() > 0.5 / (3 * H) ** 0.5
                assert torch.equal(uw, torch.zeros_like(uw))
            else:
                for t in (dw, uw):
                    assert t.abs().max() <= 2e-2 and 0.005 < t.std() < 0.012
        else:
            d_factors, u_factors = down.own_weight_factors(), up.own_weight_factors()
            assert all(t.abs().sum() > 0 for t in d_factors)
            assert down.phm_rule.abs().sum() > 0 and up.phm_rule.abs().sum() > 0
            if init == "mam_adapter":
                assert torch.equal(u_factors[-1], torch.zeros_like(u_factors[-1]))
                assert u_factors[0].abs().sum() > 0
            elif init == "houlsby":
                assert all(t.abs().max() <= 2e-2 and t.abs().sum() > 0 for t in d_factors + u_factors)
            else:
                assert all(t.abs().sum() > 0 for t in u_factors)
        if gating:
            assert m.gate.weight.abs().sum() > 0
            if init == "houlsby":  # nn.Linear's default init, as AdapterHub leaves it
                assert m.gate.weight.abs().max() <= 1 / H**0.5 and m.gate.bias.abs().max() <= 1 / H**0.5
            else:
                assert torch.equal(m.gate.bias, torch.zeros(1))


def test_generator_determinism_and_isolation():
    kw = dict(ln_before=True, use_gating=True, init="houlsby", scaling="learned")
    for phm in (False, True):
        state = _rng_states()
        a, _ = make(phm=phm, seed=7, **kw)
        b, _ = make(phm=phm, seed=7, **kw)
        c, _ = make(phm=phm, seed=8, **kw)
        assert torch.equal(state, torch.get_rng_state())
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
        # reset_parameters(generator) reproduces construction with that generator.
        with torch.no_grad():
            for p in a.parameters():
                p.add_(1.0)
        a.reset_parameters(gen(7))
        if not phm:  # (PHM shared tensors were drawn first from the same generator in make())
            assert all(torch.equal(a.state_dict()[k], sb[k]) for k in sb)


def test_shared_phm_init_is_isolated_and_seeded():
    state = _rng_states()
    cfg = PHMConfig(shared_W_phm=True, factorized_phm_W=False, factorized_phm_rule=True, phm_c_init="uniform")
    a = init_shared_phm_parameters(H, 16, cfg, generator=gen(3))
    b = init_shared_phm_parameters(H, 16, cfg, generator=gen(3))
    assert torch.equal(state, torch.get_rng_state())
    assert set(a) == {"W_down", "W_up", "phm_rule_left", "phm_rule_right"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["phm_rule_left"].abs().max() <= 1.0  # shared rules: U(-1, 1) as in AdapterHub


def test_dtype_and_device_follow_the_same_seed():
    m32, _ = make(seed=4, dtype=torch.float32, use_gating=True)
    m64, _ = make(seed=4, dtype=torch.float64, use_gating=True)
    for k, v in m64.state_dict().items():
        assert v.dtype == torch.float64
        assert torch.equal(v.float(), m32.state_dict()[k])
    h, r, w, b = (t.double() for t in data())
    assert m64(h, r, w, b).dtype == torch.float64


def test_forward_formulas_by_hand():
    h, r, w, b = data()
    m, _ = make(init="bert", norm_eps=1e-5, use_gating=True, ln_after=True)
    m.eval()
    x = F.layer_norm(h + r, (H,), w, b, 1e-5)
    a = m.adapter_up(F.relu(m.adapter_down(x)))
    a = a * torch.sigmoid(m.gate(x)).mean(1, keepdim=True)
    y = m.adapter_norm_after(a) + h
    torch.testing.assert_close(m(h, r, w, b), F.layer_norm(y + r, (H,), w, b, 1e-5))
    # Parallel on a pre-LN site: h + r + A(r).
    p, _ = make(init="bert", norm_kind=None, is_parallel=True, scaling=3.0)
    torch.testing.assert_close(p(h, r), h + r + 3.0 * p.adapter_up(F.relu(p.adapter_down(r))))
    # RMSNorm site, original_ln_after only (Houlsby placement).
    q, _ = make(init="bert", norm_kind="rms_norm", norm_eps=1e-6, original_ln_before=False)
    y = h + q.adapter_up(F.relu(q.adapter_down(h))) + r
    torch.testing.assert_close(q(h, r, w, b), w * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) + b)
    # post_add without a norm: residual is h + r.
    s, _ = make(init="bert", norm_kind=None, residual_before_ln="post_add", original_ln_after=False)
    torch.testing.assert_close(s(h, r), h + r + s.adapter_up(F.relu(s.adapter_down(h + r))))


def test_phm_matches_explicit_kronecker():
    cfg = PHMConfig(shared_phm_rule=False, factorized_phm_rule=True, phm_rank=2)
    layer = PHMLinear(H, 16, position="down", config=cfg, generator=gen(1))
    with torch.no_grad():
        layer.bias.normal_(generator=gen(2))
    rule = layer.phm_rule_left @ layer.phm_rule_right
    W = layer.W_left @ layer.W_right
    Hm = sum(torch.kron(rule[i], W[i]) for i in range(cfg.phm_dim))
    torch.testing.assert_close(kronecker_sum(rule, W), Hm)
    x = torch.randn(3, H, generator=gen(3))
    torch.testing.assert_close(layer(x), x @ Hm + layer.bias)


def test_train_mode_dropout_and_stochastic_depth():
    m, _ = make(init="bert", dropout=0.5, stochastic_depth=0.5)
    h, r, w, b = data()
    m.eval()
    ev = m(h, r, w, b)
    torch.testing.assert_close(m(h, r, w, b), ev)
    m.train()
    assert not torch.allclose(m(h, r, w, b), ev)


def test_learn_phm_flag_and_shared_not_in_state_dict():
    m, shared = make(phm=True, learn_phm=False, shared_rule=False)
    assert not m.adapter_down.phm_rule.requires_grad and m.adapter_down.W_left.requires_grad
    m2, shared2 = make(phm=True, shared_rule=True)
    assert not any("phm_rule" in k for k in m2.state_dict())  # owned (and saved) by the caller
    assert m2.adapter_down.shared is shared2 and m2.adapter_up.shared is shared2


def test_export_with_caller_owned_shared_parameters():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = PHMConfig(shared_W_phm=True)
            self.shared = init_shared_phm_parameters(H, 16, cfg, generator=gen(0))
            self.site0 = BottleneckAdapter(H, reduction_factor=4, phm_layer=True, shared_W_phm=True,
                                           shared=self.shared, generator=gen(1))  # fmt: skip
            self.site1 = BottleneckAdapter(H, reduction_factor=4, phm_layer=True, shared_W_phm=True,
                                           shared=self.shared, generator=gen(2), norm_kind=None)  # fmt: skip

        def forward(self, h, r, w, b):
            return self.site1(self.site0(h, r, w, b), r)

    owner = Owner().eval()
    args = data()
    ep = torch.export.export(owner, args, strict=False)
    names = [n for n, _ in ep.named_parameters()]
    assert sum(n.startswith("shared.") for n in names) == len(owner.shared)
    assert not any("site0.shared" in n or "site1.shared" in n for n in names)
    torch.testing.assert_close(ep.module()(*args), owner(*args))


def test_validation_errors():
    with pytest.raises(SpecError):
        BottleneckAdapter(H, reduction_factor=4, original_ln_before=False, residual_before_ln="post_add")
    with pytest.raises(SpecError):
        BottleneckAdapter(H, reduction_factor=4, scaling="bogus")
    with pytest.raises(SpecError):
        BottleneckAdapter(H, reduction_factor=4, non_linearity="prelu")
    with pytest.raises(SpecError, match="shared"):
        BottleneckAdapter(H, reduction_factor=4, phm_layer=True)  # shared_phm_rule=True needs the dict
    with pytest.raises(SpecError, match="phm_dim"):
        BottleneckAdapter(H, reduction_factor=32, phm_layer=True, shared_phm_rule=False)  # bottleneck 2 vs dim 4
    with pytest.raises(SpecError):
        BottleneckAdapter(H, reduction_factor=4, norm_kind="batch_norm")
    BottleneckAdapter(H, reduction_factor=4, scaling=4)  # ints are fine (AdapterHub rejects them)


def test_all_activations_run():
    h, r, w, b = data()
    for name in ACTIVATIONS:
        m, _ = make(non_linearity=name.upper())
        assert m(h, r, w, b).isfinite().all()


def test_load_adapterhub_state_dict_round_trip():
    m, _ = make(phm=True, shared_rule=False, ln_before=True, ln_after=True, use_gating=True, scaling="channel")
    key_map = adapterhub_key_map(m)
    assert key_map["adapter_down.1.W_left"] == "adapter_down.W_left"
    assert key_map["adapter_up.b"] == "adapter_up.bias"
    assert key_map["adapter_down.0.weight"] is None  # AdapterHub's alias of adapter_norm_before
    g = gen(9)
    sd = {src: torch.randn(m.state_dict()[dst].shape, generator=g) for src, dst in key_map.items() if dst}
    sd["adapter_down.0.weight"] = sd["adapter_norm_before.weight"]
    sd["adapter_down.0.bias"] = sd["adapter_norm_before.bias"]
    load_adapterhub_state_dict(m, {f"x.adapters.a.{k}": v for k, v in sd.items()}, prefix="x.adapters.a.")
    for src, dst in key_map.items():
        if dst:
            assert torch.equal(m.state_dict()[dst], sd[src])
    with pytest.raises(CheckpointError):
        load_adapterhub_state_dict(m, {**sd, "adapter_up.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        load_adapterhub_state_dict(m, {k: v for k, v in sd.items() if k != "adapter_up.b"})


def test_kwargs_from_adapterhub_config():
    cfg = {"reduction_factor": {"1": 8, "default": 16}, "non_linearity": "swish", "original_ln_before": False,
           "mh_adapter": True, "leave_out": [], "init_weights_seed": None, "scaling": 1.0}  # fmt: skip
    assert kwargs_from_adapterhub_config(cfg, layer_idx=1)["reduction_factor"] == 8
    kw = kwargs_from_adapterhub_config(cfg, layer_idx=0)
    assert kw == {"reduction_factor": 16, "non_linearity": "swish", "original_ln_before": False, "scaling": 1.0}
    BottleneckAdapter(H, **kw)
