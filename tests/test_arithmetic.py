"""Adapter arithmetic: ``add_weighted_adapter`` gives PEFT's adapters for every combination type, and
``to_low_rank`` turns any mergeable adapter into a LoRA (exact at full rank, the best approximation below it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

import graphadapt as ga
from graphadapt import Spec

from helpers import max_diff, text_inputs, tiny_bert, tiny_llama

COMBINATIONS = ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
# two LoRAs of one rank on overlapping sites (q in both, v only in a, o only in b), different scalings (rsLoRA too)
PEFT_CFGS = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "b": dict(r=4, lora_alpha=6, target_modules=["q_proj", "o_proj"], use_rslora=True)}
OURS = {"a": ga.LoRA(r=4, alpha=8, targets=("q", "v")), "b": ga.LoRA(r=4, alpha=6, targets=("q", "o"), use_rslora=True)}
WEIGHTS = [0.7, -0.4]


def _peft_key(name: str, adapter: str) -> tuple[str, str]:
    """PEFT parameter name → (our site path, our tensor name)."""
    path, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
    kind, _, _ = rest.partition(f".{adapter}")
    return path, {"A": "lora_A", "B": "lora_B"}[kind]


def _lora_pair():
    """A PEFT model and a graphadapt model holding the same two LoRAs with seeded non-zero weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), LoraConfig(**PEFT_CFGS["a"]), adapter_name="a")
        pm.add_adapter("b", LoraConfig(**PEFT_CFGS["b"]))
    ours = ga.apply(tiny_llama(), Spec(dict(OURS)))
    g = torch.Generator().manual_seed(0)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            for adapter in ("a", "b"):
                if f".{adapter}." in n and "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                    path, kind = _peft_key(n, adapter)
                    params[f"adapters.{adapter}.{path}.{kind}"].copy_(p)
    return pm.eval(), ours.eval()


@pytest.fixture(scope="module")
def pair():
    return _lora_pair()


def _peft_factors(pm, name):
    out = {}
    for n, p in pm.named_parameters():
        if f".{name}." in n and "lora_" in n:
            path, kind = _peft_key(n, name)
            out[(path, kind)] = p.detach()
    return out


def _our_factors(adapted, name):
    return {(r.site, kind): getattr(adapted.get_submodule(r.target), kind).detach()
            for r in adapted.adapter_records if r.adapter == name for kind in ("lora_A", "lora_B")}


@pytest.mark.parametrize("combination_type", COMBINATIONS)
def test_add_weighted_adapter_equals_peft(pair, combination_type):
    pm, ours = pair
    name = f"mix_{combination_type}"
    kw = {} if combination_type in ("svd", "linear", "cat") else dict(density=0.5)
    if combination_type.startswith("ties"):
        kw["majority_sign_method"] = "frequency"
    if combination_type == "svd":
        kw.update(svd_rank=3, svd_clamp=0.99)
    torch.manual_seed(7)
    pm.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=combination_type, **kw)
    ours.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=combination_type, seed=7, **kw)
    ref, got = _peft_factors(pm, name), _our_factors(ours, name)
    assert set(ref) == set(got) and len(got) == 12   # q, v, o in both layers, A and B
    for k in ref:
        assert ref[k].shape == got[k].shape, k
        assert (ref[k] - got[k]).abs().max() < 1e-6, (k, (ref[k] - got[k]).abs().max())
    assert ours.spec.adapters[name].scaling == 1.0
    x = text_inputs(2, 6)
    pm.set_adapter(name)
    ours.set_active(name)
    with torch.no_grad():
        want = pm(**x).last_hidden_state
        have = ours(**x).last_hidden_state
        with pm.disable_adapter():
            plain = pm(**x).last_hidden_state
    ours.set_active(["a", "b"])
    assert max_diff(have, want) < 1e-5   # the factors agree within 1e-6 (above); outputs differ by graph numerics
    assert max_diff(have, plain) > 1e-3   # the combined adapter does something


def test_cat_is_exact_and_the_new_adapter_is_a_normal_one(pair, tmp_path):
    """``cat`` (and ``linear`` of one adapter) reproduce ``Σ w_i ΔW_i`` exactly; the result trains, saves and merges."""
    _, ours = pair
    ours.add_weighted_adapter(["a", "b"], WEIGHTS, "exact", combination_type="cat")
    x = text_inputs(2, 6)
    with torch.no_grad():
        base = ours.disable_adapters()
        with base:
            y0 = ours(**x).last_hidden_state
        ours.set_active("a")
        ya = ours(**x).last_hidden_state
        ours.set_active("b")
        yb = ours(**x).last_hidden_state
        ours.set_active("exact")
        yc = ours(**x).last_hidden_state
    # the deltas of a and b at q are linear in the weights: check on the merged weights instead of outputs
    mods = {r.site: ours.get_submodule(r.target) for r in ours.adapter_records if r.adapter == "exact"}
    srcs = {a: {r.site: ours.get_submodule(r.target) for r in ours.adapter_records if r.adapter == a} for a in "ab"}
    for site, m in mods.items():
        want = sum(w * srcs[a][site].delta_weight() for a, w in zip("ab", WEIGHTS) if site in srcs[a])
        assert (m.delta_weight() - want).abs().max() < 1e-6
    assert max_diff(yc, y0) > 1e-3 and max_diff(ya, yb) > 1e-3
    assert all(p.requires_grad for n, p in ours.named_parameters() if n.startswith("adapters.exact."))
    ours.save_adapters(tmp_path / "s", names=["exact"])
    ours.merge(["exact"])
    with torch.no_grad():
        ym = ours(**x).last_hidden_state
    ours.unmerge()
    ours.set_active(["a", "b"])
    assert max_diff(ym, yc) < 1e-5
    ours.delete_adapter("exact")


def test_dare_masks_follow_the_seed(pair):
    """The masks come from ``seed`` alone (isolated from the global RNG): the same seed again gives the same adapter
    (``mix_dare_ties`` was made with seed 7 by the PEFT comparison), another seed another one."""
    _, ours = pair
    if "mix_dare_ties" not in ours.spec.adapters:
        ours.add_weighted_adapter(["a", "b"], WEIGHTS, "mix_dare_ties", combination_type="dare_ties", density=0.5,
                                  seed=7)
    torch.manual_seed(123)
    ours.add_weighted_adapter(["a", "b"], WEIGHTS, "d7", combination_type="dare_ties", density=0.5, seed=7)
    ours.add_weighted_adapter(["a", "b"], WEIGHTS, "d8", combination_type="dare_ties", density=0.5, seed=8)
    f7, again, f8 = (_our_factors(ours, n) for n in ("mix_dare_ties", "d7", "d8"))
    assert all(torch.equal(f7[k], again[k]) for k in f7)
    assert any(not torch.equal(f7[k], f8[k]) for k in f7)


def test_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ga.GraphAdaptError, match="unknown adapter"):
        ours.add_weighted_adapter(["a", "zz"], [1, 1], "m")
    with pytest.raises(ga.GraphAdaptError, match="already exists"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "a")
    with pytest.raises(ga.GraphAdaptError, match="one finite number per adapter"):
        ours.add_weighted_adapter(["a", "b"], [1], "m")
    with pytest.raises(ga.SpecError, match="needs density"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ga.SpecError, match="not available here"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="average")
    assert "m" not in ours.spec.adapters


def test_ia3_weighted_adapter_equals_peft():
    cfgs = {"a": dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "b": dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), IA3Config(**cfgs["a"]), adapter_name="a")
        pm.add_adapter("b", IA3Config(**cfgs["b"]))
    ours = ga.apply(tiny_llama(), Spec({"a": ga.IA3(targets=("k", "down"), feedforward=("down",)),
                                        "b": ga.IA3(targets=("k", "v"), feedforward=())}))
    params = dict(ours.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                adapter = n.rsplit(".", 1)[1]
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
                path = n.removeprefix("base_model.model.").split(".ia3_l")[0]
                params[f"adapters.{adapter}.{path}.ia3_l"].copy_(p)
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.5], "mix")
    ours.add_weighted_adapter(["a", "b"], [0.6, 0.5], "mix")
    x = text_inputs(2, 6)
    pm.set_adapter("mix")
    ours.set_active("mix")
    with torch.no_grad():
        want, have = pm(**x).last_hidden_state, ours(**x).last_hidden_state
        with pm.disable_adapter():
            plain = pm(**x).last_hidden_state
    assert max_diff(have, want) < 1e-6 and max_diff(have, plain) > 1e-3
    assert len([r for r in ours.adapter_records if r.adapter == "mix"]) == 6
    with pytest.raises(ga.SpecError, match="linearly only"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties", density=0.5)


def test_to_low_rank_is_exact_at_full_rank_and_the_svd_optimum_below():
    """IA3 on BERT (output scaling changes the bias too) → LoRA: full rank reproduces the outputs (bias change in
    ``lora_bias``); at rank k the LoRA's ΔW is the truncated SVD, whose error is the tail of the singular values."""
    base = tiny_bert()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)   # HF initialises biases to 0
    adapted = ga.apply(base, Spec({"t": ga.IA3(targets=("k", "v", "down"), feedforward=("down",))}))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters.t."):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    x = text_inputs(2, 6)
    with torch.no_grad():
        want = adapted(**x).last_hidden_state
        with adapted.disable_adapters():
            plain = adapted(**x).last_hidden_state
    adapted.to_low_rank("t", 32, "full")
    adapted.to_low_rank("t", 2, "low")
    assert adapted.spec.adapters["full"].lora_bias   # IA3's output scaling changes k's and v's biases
    adapted.set_active("full")
    with torch.no_grad():
        got = adapted(**x).last_hidden_state
    assert max_diff(got, want) < 1e-5 and max_diff(got, plain) > 1e-3
    src = {r.site: adapted.get_submodule(r.target) for r in adapted.adapter_records if r.adapter == "t"}
    low = {r.site: adapted.get_submodule(r.target) for r in adapted.adapter_records if r.adapter == "low"}
    assert set(low) == set(src) and len(low) == 6
    for site, m in low.items():
        rec = next(r for r in adapted.adapter_records if r.adapter == "t" and r.site == site)
        w = adapted.get_parameter(rec.weight).detach()
        dw = src[site].fold(w, None, base_weight=w)[0] - w
        s = torch.linalg.svdvals(dw)
        err = torch.linalg.matrix_norm(m.delta_weight() - dw)
        assert abs(err - s[2:].pow(2).sum().sqrt()) < 1e-4 * s[0]   # Eckart–Young: the best rank-2 error
        assert m.r == 2
    adapted.set_active("t")


def test_to_low_rank_refuses_what_does_not_fold():
    adapted = ga.apply(tiny_bert(), Spec({"g": ga.LoRA(r=2, targets=("q",), use_gating=True), "h": ga.SeqBn()}))
    with pytest.raises(ga.SpecError, match="gate depends on the input"):
        adapted.to_low_rank("g", 2, "x")
    with pytest.raises(ga.SpecError, match="residual site"):
        adapted.to_low_rank("h", 2, "x")
    with pytest.raises(ga.SpecError, match="cannot be combined by add_weighted_adapter"):
        adapted.add_weighted_adapter(["h"], [1.0], "x")
    with pytest.raises(ga.SpecError, match="one method"):
        adapted.add_weighted_adapter(["g", "h"], [1.0, 1.0], "x")
    with pytest.raises(ga.SpecError, match="rank must be a positive int"):
        adapted.to_low_rank("g", 0, "x")
    assert "x" not in adapted.spec.adapters
