"""LoRA options PEFT users set: ``lora_bias``, ``rank_pattern``/``alpha_pattern``, inits ``olora`` and ``orthogonal``
— each imported from PEFT with PEFT's outputs, and each doing something."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import graphadapt as ga
from graphadapt import import_peft

from helpers import max_diff, text_inputs, tiny_bert, tiny_llama


def _biased_bert():
    m = tiny_bert()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _trained(make, cfg, tmp_path, scale=0.1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(make(), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(p + torch.randn(p.shape, generator=g) * scale)
    pm.eval().save_pretrained(tmp_path)
    return pm


def test_lora_bias_import_merge_and_export(tmp_path):
    pm = _trained(_biased_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True), tmp_path)
    adapted = import_peft(_biased_bert(), tmp_path)
    assert adapted.spec.adapters["default"].lora_bias
    x = text_inputs(3, 6, pad=2)
    biases = [adapted.get_submodule(r.target).lora_bias for r in adapted.adapter_records]
    assert len(biases) == 4 and all(b.abs().max() > 0 and b.requires_grad for b in biases)
    with torch.no_grad():
        ref = pm(**x).last_hidden_state
        got = adapted(**x).last_hidden_state
        kept = [b.detach().clone() for b in biases]
        for b in biases:
            b.zero_()
        without = adapted(**x).last_hidden_state
        for b, k in zip(biases, kept):
            b.copy_(k)
    assert max_diff(got, ref) < 1e-5
    assert max_diff(without, ref) > 1e-4   # the bias of lora_B counts
    adapted.merge()
    with torch.no_grad():
        merged = adapted(**x).last_hidden_state
    adapted.unmerge()
    assert max_diff(merged, ref) < 1e-5
    adapted.to_peft(tmp_path / "back")
    again = PeftModel.from_pretrained(_biased_bert(), tmp_path / "back").eval()
    with torch.no_grad():
        assert max_diff(again(**x).last_hidden_state, ref) < 1e-5
    with pytest.raises(ga.SpecError, match="needs a layer with a bias"):
        ga.apply(tiny_llama(), ga.LoRA(targets=("q",), lora_bias=True))
    with pytest.raises(ga.SpecError, match="lora_bias cannot be combined"):
        ga.LoRA(lora_bias=True, use_dora=True)


def test_rank_and_alpha_patterns_import(tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
               rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"down_proj": 3})
    pm = _trained(tiny_llama, cfg, tmp_path)
    adapted = import_peft(tiny_llama(), tmp_path)
    mods = {r.site: adapted.get_submodule(r.target) for r in adapted.adapter_records}
    assert mods["layers.0.self_attn.q_proj"].r == 4 and mods["layers.0.self_attn.v_proj"].r == 2
    assert mods["layers.1.mlp.down_proj"].r == 6 and mods["layers.0.mlp.down_proj"].r == 4
    assert mods["layers.0.mlp.down_proj"].scaling == 3 / 4 and mods["layers.1.mlp.down_proj"].scaling == 3 / 6
    x = text_inputs(3, 6, pad=2)
    with torch.no_grad():
        ref = pm(**x).last_hidden_state
        got = adapted(**x).last_hidden_state
    assert max_diff(got, ref) < 1e-5
    spec = adapted.spec.adapters["default"]
    assert ga.MethodSpec.from_dict(spec.to_dict()) == spec   # the patterns survive the spec's JSON form
    with pytest.raises(ga.SpecError, match="rank_pattern"):
        ga.LoRA(rank_pattern={"q_proj": 0})
    with pytest.raises(ga.SpecError, match="not a valid regex"):
        ga.LoRA(alpha_pattern={"(": 2})


def test_olora_init_equals_peft():
    """PEFT's OLoRA: same A, B and residual base weights; the model is unchanged at init."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="olora"))
    adapted = ga.apply(tiny_llama(), ga.LoRA(r=4, alpha=8, targets=("q", "v"), init="olora"))
    peft_params = dict(pm.named_parameters())
    ours = dict(adapted.named_parameters())
    n = 0
    for r in adapted.adapter_records:
        pre = f"base_model.model.{r.site}"
        mod = adapted.get_submodule(r.target)
        assert (mod.lora_A - peft_params[f"{pre}.lora_A.default.weight"]).abs().max() < 1e-5
        assert (mod.lora_B - peft_params[f"{pre}.lora_B.default.weight"]).abs().max() < 1e-5
        assert (ours[r.weight] - peft_params[f"{pre}.base_layer.weight"]).abs().max() < 1e-5
        assert mod.lora_B.abs().max() > 0.1   # not a zero B: OLoRA moved W's top part into the adapter
        n += 1
    assert n == 4
    x = text_inputs(2, 5)
    with torch.no_grad():
        assert max_diff(adapted(**x).last_hidden_state, tiny_llama()(**x).last_hidden_state) < 1e-5


def test_olora_checkpoint_import_applies_to_the_residual(tmp_path):
    """PEFT re-runs OLoRA when it loads the adapter (the saved factors apply to the residual weights): so does
    the importer; an init it cannot reproduce is refused rather than imported with wrong numbers."""
    import json

    pm = _trained(tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"), tmp_path)
    adapted = import_peft(tiny_llama(), tmp_path)
    assert adapted.spec.adapters["default"].init == "olora"
    x = text_inputs(2, 5)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(**x).last_hidden_state
        assert max_diff(pm(**x).last_hidden_state, ref) < 1e-6
        assert max_diff(adapted(**x).last_hidden_state, ref) < 1e-5
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ga.CheckpointError, match="init_lora_weights"):
        import_peft(tiny_llama(), tmp_path)


def test_orthogonal_init_equals_peft_draws():
    """PEFT's orthogonal init draws r×r, in×r/2, r/2×out normals from the global RNG; ours draws the same from an
    explicit generator: the same seed gives the same factors; B·A = 0 with both non-zero."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from graphadapt.methods.lora import LoRAModule
    from graphadapt.methods.lora.init import orthogonal_

    base = torch.nn.Linear(12, 10)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    layer = PeftLinear(base, "default", r=4, lora_alpha=8, config=cfg)
    torch.manual_seed(5)
    layer.orthogonal_init("default")
    mod = LoRAModule(12, 10, r=4, alpha=8)
    orthogonal_(mod, torch.Generator().manual_seed(5))
    assert torch.allclose(mod.lora_A, layer.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(mod.lora_B, layer.lora_B["default"].weight, atol=1e-6)
    assert mod.lora_A.abs().min() > 0 and (mod.lora_B @ mod.lora_A).abs().max() < 1e-6
    adapted = ga.apply(tiny_bert(), ga.LoRA(r=4, targets=("q",), init="orthogonal"))
    m = adapted.get_submodule(adapted.adapter_records[0].target)
    assert m.lora_B.abs().max() > 0 and (m.lora_B @ m.lora_A).abs().max() < 1e-6
    with pytest.raises(ga.SpecError, match="even rank"):
        orthogonal_(LoRAModule(12, 10, r=3, alpha=3), torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_init_equals_peft(method):
    """CorDA from a calibration callback: PEFT's factors and residual weights (1e-5), outputs unchanged at init."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from graphadapt.methods.lora import corda_init

    batches = [text_inputs(1, 6, seed=s) for s in range(3)]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=method))
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            preprocess_corda(base, cfg, run_model=lambda: [base(**b) for b in batches])
        pm = get_peft_model(base, cfg)
    adapted = ga.apply(tiny_llama(), ga.LoRA(r=4, alpha=8, targets=("q", "down")))
    with torch.no_grad():
        corda_init(adapted, "default", lambda: [adapted(**b) for b in batches], method=method)
    peft_params = dict(pm.named_parameters())
    for r in adapted.adapter_records:
        pre = f"base_model.model.{r.site}"
        mod = adapted.get_submodule(r.target)
        assert (mod.lora_A - peft_params[f"{pre}.lora_A.default.weight"]).abs().max() < 1e-5
        assert (mod.lora_B - peft_params[f"{pre}.lora_B.default.weight"]).abs().max() < 1e-5
        assert (adapted.get_parameter(r.weight) - peft_params[f"{pre}.base_layer.weight"]).abs().max() < 1e-5
        assert mod.lora_B.abs().max() > 1e-3
    x = text_inputs(2, 5)
    with torch.no_grad():
        assert max_diff(adapted(**x).last_hidden_state, tiny_llama()(**x).last_hidden_state) < 1e-4
    with pytest.raises(ga.GraphAdaptError, match="one example per call"):
        corda_init(adapted, "default", lambda: adapted(**text_inputs(2, 5)))


def test_layer_replication_matches_peft_and_merges_each_copy(tmp_path):
    """PEFT's layer_replication ([[0, 2], [1, 2]]: layers 0 1 1, the copies sharing base weights, each with its own
    LoRA): import gives PEFT's logits; the caller's model is untouched; merge folds each copy into a weight of its
    own (exact; PEFT's merge_and_unload adds both copies' deltas to the one shared weight), an in-place merge is
    refused (it would write the shared storage); save/load and ONNX keep the replication."""
    from graphadapt.exporters.onnx import export_onnx

    base = tiny_llama(causal_lm=True).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}
    pm = _trained(lambda: tiny_llama(causal_lm=True), dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                           layer_replication=[[0, 2], [1, 2]]), tmp_path, scale=0.3)
    assert len(pm.base_model.model.model.layers) == 3
    with torch.no_grad():
        ref = pm(**x).logits
        plain = base(**x).logits
    a = import_peft(base, tmp_path, example_kwargs=x)
    assert a.spec.layer_replication == ((0, 2), (1, 2))
    assert len(base.model.layers) == 2 and base.config.num_hidden_layers == 2          # the caller's model
    sites = {r.target.removeprefix("adapters.default.") for r in a.adapter_records}
    assert sites == {f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    l1, l2 = (a.get_submodule(f"adapters.default.model.layers.{i}.self_attn.q_proj") for i in (1, 2))
    assert max_diff(l1.lora_B, l2.lora_B) > 1e-3                                        # one LoRA per copy
    with torch.no_grad():
        got = a(**x).logits
        assert max_diff(got, ref) < 1e-5 and max_diff(got, plain) > 1e-2
        l2.active = False
        assert max_diff(a(**x).logits, got) > 1e-4                                     # the copy's LoRA acts
        l2.active = True
    with pytest.raises(ga.MergeError, match="shared with model.layers.2.self_attn.q_proj.weight.*in_place=False"):
        a.merge(in_place=True)
    w1 = a.get_parameter("model.layers.1.self_attn.q_proj.weight").detach().clone()
    a.merge()
    with torch.no_grad():
        assert max_diff(a(**x).logits, ref) < 1e-5
    assert max_diff(a.get_parameter("model.layers.1.self_attn.q_proj.weight"),
                    a.get_parameter("model.layers.2.self_attn.q_proj.weight")) > 1e-4   # each copy its own fold
    assert torch.equal(base.model.layers[1].self_attn.q_proj.weight, w1)                # shared storage untouched
    a.unmerge()
    a.save_adapters(tmp_path / "ours")
    again = ga.load(tiny_llama(causal_lm=True).eval(), tmp_path / "ours", example_kwargs=x)
    with torch.no_grad():
        assert max_diff(again(**x).logits, ref) < 1e-5
    rep = export_onnx(a, tmp_path / "rep.onnx", example_inputs=x, merge=False, verify=True)
    assert rep.node_count > 0


def test_layer_replication_spec_trains_each_copy_and_checks_ranges():
    """Spec(layer_replication=...) from scratch: each copy draws its own adapter (seeded by site), the spec
    round-trips through its dict; bad ranges are SpecErrors naming the field."""
    base = tiny_llama(causal_lm=True).eval()
    spec = ga.Spec({"l": ga.LoRA(r=2, targets=("q",))}, layer_replication=[[0, 2], [0, 1]])
    assert ga.Spec.from_dict(spec.to_dict()) == spec
    a = ga.apply(base, spec)
    q = [a.get_submodule(f"adapters.l.model.layers.{i}.self_attn.q_proj") for i in range(3)]
    assert max_diff(q[0].lora_A, q[2].lora_A) > 1e-3                                   # layer 0 twice, two LoRAs
    loss = a(input_ids=torch.randint(0, 50, (2, 5))).logits.pow(2).mean()
    loss.backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().max() > 0 for m in q)   # B = 0: A gets none yet
    assert not any(p.requires_grad for n, p in a.named_parameters() if not n.startswith("adapters."))
    for bad, msg in (([[1, 0]],  "0 <= start < end"), ([], "non-empty"), ([[0, 9]], "past the model's 2 layers")):
        with pytest.raises(ga.SpecError, match=msg):
            ga.apply(base, ga.Spec({"l": ga.LoRA(r=2, targets=("q",))}, layer_replication=bad))
