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

def bert1():
    return tiny_bert(num_hidden_layers=1)


def llama1():
    return tiny_llama(num_hidden_layers=1)


def gpt2_1():
    return tiny_gpt2(n_layer=1)


# one-layer models keep the captures cheap; each case still adapts several layer kinds
# (method, model builder, PEFT config, std of the noise put on PEFT's adapter tensors)
CASES = {
    "loha-bert": ("loha", bert1, lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["query", "value", "dense"]),
                  0.3),
    "loha-llama": ("loha", llama1, lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]),
                   0.3),
    "loha-bert-patterns": ("loha", bert1, lambda: peft.LoHaConfig(
        r=4, alpha=6, rank_pattern={"value": 2, "intermediate.dense": 3}, alpha_pattern={r"layer\.0\..*query": 9},
        target_modules=["query", "value", "dense"]), 0.3),
    "lokr-bert": ("lokr", bert1, lambda: peft.LoKrConfig(r=4, alpha=6, target_modules=["query", "value", "dense"]),
                  0.3),
    "lokr-llama-decomposed": ("lokr", llama1, lambda: peft.LoKrConfig(
        r=1, alpha=2, decompose_both=True, target_modules=["q_proj", "k_proj", "up_proj"]), 0.3),
    "lokr-llama-patterns": ("lokr", llama1, lambda: peft.LoKrConfig(
        r=1, alpha=2, decompose_both=True, rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 5},
        target_modules=["q_proj", "k_proj", "up_proj"]), 0.3),
    "vera-bert": ("vera", bert1, lambda: peft.VeraConfig(r=8, target_modules=["query", "value", "dense"]), 0.5),
    "vera-llama": ("vera", llama1, lambda: peft.VeraConfig(r=4, target_modules=["k_proj", "down_proj"]), 0.5),
    "vera-gpt2-conv1d": ("vera", gpt2_1, lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                                    fan_in_fan_out=True), 0.5),
    "fourierft-bert": ("fourierft", bert1, lambda: peft.FourierFTConfig(
        n_frequency=40, scaling=50.0, target_modules=["query", "value", "dense"]), 1.0),
    "fourierft-bert-pattern": ("fourierft", bert1, lambda: peft.FourierFTConfig(
        n_frequency=40, scaling=50.0, n_frequency_pattern={"value": 12, r"intermediate\.dense": 70},
        target_modules=["query", "value", "dense"]), 1.0),
    "fourierft-llama": ("fourierft", llama1, lambda: peft.FourierFTConfig(
        n_frequency=30, random_loc_seed=5, target_modules=["v_proj", "gate_proj"]), 1.0),
    "fourierft-gpt2-conv1d": ("fourierft", gpt2_1, lambda: peft.FourierFTConfig(
        n_frequency=30, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 1.0),
    "shira-bert": ("shira", bert1, lambda: peft.ShiraConfig(r=2, target_modules=["query", "value", "dense"]), 0.3),
    "shira-llama": ("shira", llama1, lambda: peft.ShiraConfig(r=1, random_seed=4,
                                                                  target_modules=["o_proj", "up_proj"]), 0.3),
    "c3a-bert": ("c3a", bert1, lambda: peft.C3AConfig(block_size=8, target_modules=["query", "value", "dense"]),
                 1.0),
    "c3a-bert-pattern": ("c3a", bert1, lambda: peft.C3AConfig(
        block_size=8, block_size_pattern={"value": 4, r"intermediate\.dense": 16},
        target_modules=["query", "value", "dense"]), 1.0),
    "c3a-llama": ("c3a", llama1, lambda: peft.C3AConfig(block_size=4, target_modules=["k_proj", "down_proj"]), 1.0),
    "randlora-bert": ("randlora", bert1, lambda: peft.RandLoraConfig(
        r=8, randlora_alpha=16, target_modules=["query", "value", "dense"]), 0.3),
    "randlora-llama": ("randlora", llama1, lambda: peft.RandLoraConfig(
        r=3, randlora_alpha=6, target_modules=["k_proj", "up_proj", "down_proj"]), 0.3),
    "randlora-gpt2-conv1d": ("randlora", gpt2_1, lambda: peft.RandLoraConfig(
        r=4, randlora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), 0.3),
    "vblora-bert": ("vblora", bert1, lambda: peft.VBLoRAConfig(
        r=4, num_vectors=16, vector_length=8, topk=3, target_modules=["query", "value", "dense"]), 0.5),
    "vblora-llama": ("vblora", llama1, lambda: peft.VBLoRAConfig(
        r=2, num_vectors=8, vector_length=4, target_modules=["k_proj", "gate_proj"]), 0.5),
    "vblora-gpt2-conv1d": ("vblora", gpt2_1, lambda: peft.VBLoRAConfig(
        r=2, num_vectors=8, vector_length=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 0.5),
    "gralora-bert": ("gralora", bert1, lambda: peft.GraloraConfig(
        r=8, alpha=16, gralora_k=2, target_modules=["query", "value", "dense"]), 0.3),
    "gralora-llama-hybrid": ("gralora", llama1, lambda: peft.GraloraConfig(
        r=8, alpha=12, gralora_k=4, hybrid_r=2, target_modules=["k_proj", "down_proj"]), 0.3),
    "gralora-gpt2-conv1d": ("gralora", gpt2_1, lambda: peft.GraloraConfig(
        r=4, alpha=8, gralora_k=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 0.3),
    "waveft-bert": ("waveft", bert1, lambda: peft.WaveFTConfig(
        n_frequency=60, scaling=5.0, target_modules=["query", "value", "dense"]), 0.3),
    "waveft-bert-pattern": ("waveft", bert1, lambda: peft.WaveFTConfig(
        n_frequency=60, scaling=5.0, n_frequency_pattern={"value": 20, "intermediate.dense": 90},
        target_modules=["query", "value", "dense"]), 0.3),
    "waveft-llama-odd": ("waveft", lambda: tiny_llama(num_hidden_layers=1, intermediate_size=63),
                         lambda: peft.WaveFTConfig(
        n_frequency=40, random_loc_seed=3, target_modules=["k_proj", "up_proj", "down_proj"]), 0.3),  # odd sides
    "waveft-gpt2-no-idwt": ("waveft", gpt2_1, lambda: peft.WaveFTConfig(
        n_frequency=50, use_idwt=False, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 0.3),
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
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT's SHiRA: torch's sparse-invariant notice
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
    "lokr": dict(r=2, init_weights=False),
    "vera": dict(r=4, init_weights=False, projection_prng_key=0),
    "fourierft": dict(n_frequency=50, scaling=20.0, init_weights=False),
    "shira": dict(r=2, init_weights=False, random_seed=5),
    "c3a": dict(block_size=8, init_weights="gaussian"),
    "randlora": dict(r=4, alpha=8, init_weights=False),
    "vblora": dict(r=2, num_vectors=8, vector_length=8),
    "gralora": dict(r=4, k=2, hybrid_r=2, init_weights=False),
    "waveft": dict(n_frequency=60, init_weights=False, scaling=100.0),
}


SIZES = {"c3a": dict(block_size=8), "shira": dict(r=4), "vblora": dict(num_vectors=16, vector_length=8),
         "waveft": dict(n_frequency=100)}  # what the defaults (sized for real models) need on the tiny ones
PEFT_EXPORT = ("loha", "lokr", "fourierft", "c3a", "gralora", "waveft",  # AdaptedModel.to_peft
               "vera", "randlora", "vblora", "shira")  # shared tensors / index buffers go along
NOT_IDENTITY_BY_DEFAULT = {"fourierft", "c3a", "vblora"}  # PEFT's default init draws the coefficients


def _spec(method, **kw):
    return get_method(method).spec_class(**kw)


def test_native_seeded_identity_save_load(tmp_path):
    """Per method, adapter "<m>0" has the default init (PEFT's: ΔW = 0 where PEFT starts at the identity) and "<m>1" a
    non-identity one; all drawn from per-site generators, so a second apply gives the same tensors; gradients reach
    them; save/load round-trips. One model carries every method (captures are the slow part)."""
    model, x = tiny_bert(), text_inputs(2, 5)
    adapters = {}
    for m, kw in NATIVE.items():
        adapters[f"{m}0"] = _spec(m, targets=("q", "v"), **SIZES.get(m, {}))
        adapters[f"{m}1"] = _spec(m, targets=("q", "v"), **kw)
    spec = ga.Spec(adapters, seed=1)
    one, two = ga.apply(model, spec).eval(), ga.apply(model, spec)
    s1, s2 = dict(one.named_parameters()), dict(two.named_parameters())
    ours = [n for n in s1 if n.startswith("adapters.")]
    assert ours and all(torch.equal(s1[n], s2[n]) for n in ours)
    for m in NATIVE:
        mods = {r.target: one.get_submodule(r.target) for r in one.adapter_records}
        default = [mod for t, mod in mods.items() if t.startswith(f"adapters.{m}0.")]
        drawn = [mod.delta_weight().detach() for t, mod in mods.items() if t.startswith(f"adapters.{m}1.")]
        assert len(default) == len(drawn) == 4
        if m not in NOT_IDENTITY_BY_DEFAULT:
            assert all(mod.delta_weight().abs().max() == 0 for mod in default), m
        assert all(d.abs().max() > 0 for d in drawn) and not torch.equal(drawn[0], drawn[1]), m  # per-site draws
    # where PEFT's init is deterministic (VeRA's projections, FourierFT's locations, SHiRA's seeded mask), the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {m: peft.get_peft_model(tiny_bert(), cfg) for m, cfg in (
            ("vera", peft.VeraConfig(r=4, projection_prng_key=0, target_modules=["query", "value"])),
            ("fourierft", peft.FourierFTConfig(n_frequency=50, target_modules=["query", "value"])),
            ("shira", peft.ShiraConfig(r=2, random_seed=5, target_modules=["query", "value"])))}
    for t in ("A", "B"):
        assert torch.equal(one.get_parameter(f"adapters.vera1.vera_projections.vera_{t}"),
                           getattr(ref["vera"].base_model, f"vera_{t}")["default"])
    q = "encoder.layer.1.attention.self.value"
    assert torch.equal(one.get_buffer(f"adapters.fourierft1.{q}.fourierft_locations"),
                       ref["fourierft"].get_submodule(f"base_model.model.{q}").indices["default"])
    assert torch.equal(one.get_buffer(f"adapters.shira1.{q}.shira_indices"),
                       ref["shira"].get_submodule(f"base_model.model.{q}").shira_indices["default"])
    out = _call(one, one, x)
    assert max_diff(out, _call(model, one, x)) > 1e-4
    one.train()
    # not .sum(): the final LayerNorm makes a plain sum (nearly) constant, so its gradients are rounding noise
    one(**x).last_hidden_state.pow(2).mean().backward()
    trainable = {n: p for n, p in one.named_parameters() if n.startswith("adapters.") and p.requires_grad}
    for m in NATIVE:
        got = [n for n, p in trainable.items() if n.startswith(f"adapters.{m}1.") and p.grad is not None
               and p.grad.abs().max() > 0]
        assert got, f"{m}: no gradient reaches its tensors"
    one.eval()
    one.save_adapters(tmp_path / "ckpt")
    again = ga.load(tiny_bert(), tmp_path / "ckpt").eval()
    assert max_diff(_call(again, again, x), out) == 0
    # to_peft (every method, shared tensors included): PEFT loads what graphadapt wrote and computes the same outputs
    for m in PEFT_EXPORT:
        one.set_active(f"{m}1")
        mine = _call(one, one, x)
        one.to_peft(tmp_path / m, name=f"{m}1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / m).eval()
        assert max_diff(_call(pm, one, x), mine) < 1e-5, m
        assert max_diff(mine, _call(model, one, x)) > 1e-4, m


_ROLES = ("q", "k", "v", "o", "up", "down")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """One tiny BERT carrying every method (non-identity init), each at its own role and layer, exported unmerged
    and verified against PyTorch by onnxruntime (the exporter's tolerances)."""
    pytest.importorskip("onnxruntime")
    slots = [(role, layer) for layer in (0, 1) for role in _ROLES]
    adapters = {m: _spec(m, targets=(role,), layers=(layer,), **kw) for (m, kw), (role, layer) in zip(NATIVE.items(),
                                                                                                      slots)}
    adapted = ga.apply(tiny_bert(), ga.Spec(adapters, seed=3))
    return adapted, ga.export_onnx(adapted, tmp_path_factory.mktemp("delta") / "m.onnx", merge=False, verify=True)


@pytest.mark.parametrize("method", list(NATIVE))
def test_onnx_export_verified(onnx_export, method):
    adapted, rep = onnx_export
    assert rep.verified and not rep.merged and max(rep.max_abs_diff.values()) < 1e-4
    assert any(r.method == method for r in adapted.adapter_records)


def _fake_site(**kw):
    from types import SimpleNamespace

    base = dict(name="blk.proj", in_features=32, out_features=16, out_slice=None, total_out=None, layout="linear",
                out_rows=None, num_experts=None, weight="w")
    return SimpleNamespace(**{**base, **kw})


def _build(method, site, weight, seed=0):
    """The plugin's prepare + build on a bare GraphModule holding the base weight (no capture)."""
    import torch.fx as fx

    plugin = get_method(method)
    spec = _spec(method, **NATIVE[method])
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    gm.register_parameter("w", torch.nn.Parameter(weight, requires_grad=False))
    extra = plugin.prepare(gm, "a", spec, [site], seed)
    return plugin.build(spec, "a", site, seed, weight=weight, **extra)


@pytest.mark.parametrize("method", list(NATIVE))
@pytest.mark.parametrize("geometry", ["conv1d-slice", "interleaved-rows"])
def test_module_on_fused_projection_forward_equals_fold(method, geometry):
    """A fused projection's part (GPT-2's Conv1D c_attn slice; an interleaved QKV row set): the module changes only
    its channels, and folding it into the full weight gives the same outputs (no capture needed)."""
    g = torch.Generator().manual_seed(0)
    if geometry == "conv1d-slice":
        site = _fake_site(out_slice=(16, 32), total_out=48, layout="conv1d")
        w = torch.randn(32, 48, generator=g)                     # Conv1D: [in, out]
        lin = lambda x, w, b: x @ w + b                          # noqa: E731
        mine = torch.arange(16, 32)
    else:
        rows = tuple(range(1, 32, 2))
        site = _fake_site(out_rows=rows, total_out=32)
        w = torch.randn(32, 32, generator=g)
        lin = torch.nn.functional.linear
        mine = torch.tensor(rows)
    b = torch.randn(w.shape[1] if geometry == "conv1d-slice" else 32, generator=g)
    mod = _build(method, site, w).eval()
    x = torch.randn(2, 3, 32, generator=g)
    y = lin(x, w, b)
    with torch.no_grad():
        out = mod(x, y, w, b)
        w2, b2 = mod.fold(w, b)
    others = torch.ones(y.shape[-1], dtype=torch.bool)
    others[mine] = False
    assert torch.equal(out[..., others], y[..., others])                     # other channels bit-identical
    assert (out[..., mine] - y[..., mine]).abs().max() > 1e-4                # the adapter does something
    torch.testing.assert_close(lin(x, w2, b2), out, atol=1e-5, rtol=1e-5)    # fold == forward
    rows_of = (lambda t: t.T) if geometry == "conv1d-slice" else (lambda t: t)
    assert torch.equal(rows_of(w2)[others], rows_of(w)[others])


def test_clear_errors():
    from graphadapt.errors import CheckpointError, SpecError

    with pytest.raises(SpecError, match="init_weights") as e:
        _spec("lokr", init_weights="nope")
    assert e.value.field == "init_weights"
    with pytest.raises(SpecError, match="divisible by k"):
        _spec("gralora", r=6, k=4)
    with pytest.raises(SpecError, match="wavelet_family"):
        _spec("waveft", wavelet_family="db4")
    w = torch.zeros(16, 32)
    with pytest.raises(SpecError, match="block_size=8 must divide"):
        get_method("c3a").build(_spec("c3a", block_size=8), "a", _fake_site(in_features=36, out_features=16), 0,
                                weight=torch.zeros(16, 36))
    with pytest.raises(SpecError, match="expert weights"):
        get_method("loha").build(_spec("loha"), "a", _fake_site(num_experts=4), 0, weight=w)
    refusals = [("vera", {"r": 4, "save_projection": False}),
                ("randlora", {"r": 4, "randlora_alpha": 8, "save_projection": False}),
                ("vblora", {"r": 4, "num_vectors": 8, "vector_length": 4, "save_only_topk_weights": True}),
                ("waveft", {"n_frequency": 8, "wavelet_family": "db4"}),
                ("waveft", {"n_frequency": 8, "proportional_parameters": True}),
                ("c3a", {"block_size": 8, "bias": "all"})]
    for m, cfg in refusals:
        with pytest.raises(CheckpointError, match=next(k for k in cfg if k not in ("r", "alpha", "randlora_alpha",
                                                                                  "num_vectors", "vector_length",
                                                                                  "n_frequency", "block_size"))):
            get_method(m).peft_spec(cfg, ("encoder.layer.0.attention.self.query",))
