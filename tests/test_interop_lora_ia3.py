"""PEFT IA3 import, IA3's AdapterHub options (alpha, gating) and AdapterHub LoRA/IA3 config translation.

The AdapterHub checkpoint parity tests live in tests/oracle/test_adapterhub_lora_ia3_oracle.py (oracle venv).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.checkpoints.adapterhub import from_adapterhub_config  # noqa: E402
from graphadapt.errors import CheckpointError, SpecError  # noqa: E402
from helpers import max_diff, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

PEFT_CASES = {
    # PEFT's BERT default: key, value, output.dense (both attention.output.dense and output.dense; input-scaled)
    "bert-default": (tiny_bert, dict()),
    "gpt2-fused-feedforward": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                               fan_in_fan_out=True)),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*\.down_proj")),
}


def _peft_ia3(make, cfg, path):
    from peft import IA3Config, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(make(), IA3Config(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    pm.eval().save_pretrained(path)
    return pm


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_ia3_import_matches_peft(case, tmp_path):
    pytest.importorskip("peft")
    make, cfg = PEFT_CASES[case]
    pm = _peft_ia3(make, cfg, tmp_path)
    base = make()
    adapted = ga.import_peft(base, tmp_path)
    spec = adapted.spec.adapters["default"]
    assert isinstance(spec, ga.IA3) and spec.feedforward
    x = text_inputs(3, 6, pad=2)
    extra = {"use_cache": False} if "use_cache" in adapted.constant_inputs else {}
    with torch.no_grad():
        ref, got, plain = pm(**x, **extra), adapted(**x), base(**x, **extra)
    assert max_diff(got, ref) < 1e-5
    assert max_diff(got, plain) > 1e-3  # the scaling is really applied
    n_peft = sum(1 for k in pm.state_dict() if ".ia3_l" in k)
    assert len({r.target for r in adapted.adapter_records}) == n_peft
    # merge folds PEFT's IA3 exactly
    adapted.merge()
    assert max_diff(adapted(**x), ref) < 1e-5


def test_peft_ia3_feedforward_is_input_scaling(tmp_path):
    pytest.importorskip("peft")
    _peft_ia3(tiny_bert, dict(target_modules=["value", "intermediate.dense"],
                              feedforward_modules=["intermediate.dense"]), tmp_path)
    adapted = ga.import_peft(tiny_bert(), tmp_path)
    shapes = {r.site: tuple(adapted.get_submodule(r.target).ia3_l.shape) for r in adapted.adapter_records}
    assert shapes["encoder.layer.0.intermediate.dense"] == (1, 32)  # [1, in]: input scaling
    assert shapes["encoder.layer.0.attention.self.value"] == (32, 1)


# --------------------------------------------------------------------------- AdapterHub-style IA3 options
@torch.no_grad()
def _set(adapted, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in adapted.named_parameters():
        if n.startswith("adapters."):
            p.copy_((0.5 + torch.rand(p.shape, generator=g)) if n.endswith("ia3_l") else torch.randn(p.shape, generator=g))


def test_ia3_alpha_scales_and_folds():
    model, x = tiny_bert(), text_inputs(2, 5)
    one = ga.apply(model, ga.IA3(targets=("v", "up"), feedforward=()))
    three = ga.apply(model, ga.IA3(targets=("v", "up"), feedforward=(), alpha=3))
    _set(one), _set(three)
    with torch.no_grad():
        a, b = one(**x).last_hidden_state, three(**x).last_hidden_state
    assert (a - b).abs().max() > 1e-2
    # alpha=3 is l → 3·l: the same model as alpha=1 with tripled vectors
    with torch.no_grad():
        for n, p in one.named_parameters():
            if n.endswith("ia3_l"):
                p.mul_(3)
        torch.testing.assert_close(one(**x).last_hidden_state, b, atol=1e-5, rtol=1e-5)
    report = three.merge()
    assert len(report.folded) == 4 and not report.kept
    torch.testing.assert_close(three(**x).last_hidden_state, b, atol=1e-5, rtol=1e-5)


def test_ia3_gating_is_per_example_and_stays_unmerged():
    model, x = tiny_gpt2(), text_inputs(3, 6)
    adapted = ga.apply(model, ga.IA3(targets=("v", "up"), feedforward=(), use_gating=True))
    mods = [adapted.get_submodule(r.target) for r in adapted.adapter_records]
    assert all(m.gate is not None and not m.mergeable for m in mods)
    with torch.no_grad():
        plain = model(**x, use_cache=False).last_hidden_state
        init = adapted(**x).last_hidden_state
    assert (init - plain).abs().max() > 1e-3  # the gate (~0.5) replaces alpha: not the identity at init
    _set(adapted)
    # y' = g·l⊙y with g = mean_seq sigmoid(x G^T + b): check one site directly
    m = mods[0]
    xin, y = torch.randn(3, 6, 32), torch.randn(3, 6, 96)
    with torch.no_grad():
        g = torch.sigmoid(xin @ m.gate.weight.t() + m.gate.bias).mean(dim=1, keepdim=True)
        want = y.clone()
        s, e = m.out_slice
        want[..., s:e] = y[..., s:e] * m.ia3_l.flatten() * g
        torch.testing.assert_close(m(xin, y, None, None), want)
    report = adapted.merge()
    assert not report.folded and len(report.kept) == 4 and "gate" in next(iter(report.kept.values()))
    with pytest.raises(ga.MergeError):
        adapted.unmerge() or adapted.merge(strict=True)


def test_ia3_new_fields_validate():
    with pytest.raises(SpecError) as e:
        ga.IA3(use_gating=True)  # default feedforward=("down",): input scaling cannot be gated
    assert e.value.field == "use_gating"
    with pytest.raises(SpecError) as e:
        ga.IA3(alpha=0)
    assert e.value.field == "alpha"
    s = ga.IA3(targets=("k",), feedforward=(), alpha=2, use_gating=True)
    assert ga.MethodSpec.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------- AdapterHub config translation
def test_adapterhub_presets_translate():
    lora = from_adapterhub_config("lora")
    assert lora == ga.LoRA(r=8, alpha=8, targets=("q", "v"))
    ia3 = from_adapterhub_config("ia3")
    assert ia3 == ga.IA3(targets=("k", "v", "up"), feedforward=(), alpha=1)
    full = {"architecture": "lora", "r": 4, "alpha": 16, "dropout": 0.1, "attn_matrices": ["k", "q"],
            "intermediate_lora": True, "output_lora": True, "selfattn_lora": True, "init_weights": "bert",
            "use_gating": True, "leave_out": [0], "composition_mode": "add"}
    assert from_adapterhub_config({"config": full, "name": "x"}) == ga.LoRA(
        r=4, alpha=16, dropout=0.1, targets=("q", "k", "up", "down"), leave_out=(0,), init="bert", use_gating=True)


@pytest.mark.parametrize("extra,match", [
    ({"use_dora": True, "use_gating": True}, "gated DoRA"),       # plain DoRA / VeRA import (tests/oracle)
    ({"vera_d": 0.1, "init_weights": "ia3"}, "VeRA init_weights"),
    ({"composition_mode": "scale", "r": 2}, "r=1"),
    ({"composition_mode": "scale", "r": 1, "dropout": 0.1}, "dropout"),
    ({"composition_mode": "mul"}, "composition_mode"),
    ({"n_up_projection": 3}, "n_up_projection"),
    ({"attn_matrices": ["q", "o"]}, "attn_matrices"),
    ({"selfattn_lora": False}, "adapts nothing"),
    ({"init_weights": "vera"}, "init_weights"),
])
def test_adapterhub_lora_config_errors(extra, match):
    with pytest.raises(CheckpointError, match=match):
        from_adapterhub_config({"architecture": "lora", **extra})


def test_adapterhub_llama_ffn_naming_follows_checkpoint(tmp_path):
    """AdapterHub's Llama mixin puts "intermediate" LoRA on down_proj: the importer follows the checkpoint."""
    from graphadapt.checkpoints.adapterhub import read_adapterhub_adapter

    cfg = {"architecture": "lora", "r": 2, "alpha": 2, "intermediate_lora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"config": cfg, "name": "a"}))
    sd = {f"layers.{i}.{p}.loras.a.{t}": torch.randn(s) for i in range(2) for p, t, s in [
        ("self_attn.q_proj", "lora_A", (2, 32)), ("self_attn.q_proj", "lora_B", (32, 2)),
        ("self_attn.v_proj", "lora_A", (2, 32)), ("self_attn.v_proj", "lora_B", (16, 2)),
        ("mlp.down_proj", "lora_A", (2, 64)), ("mlp.down_proj", "lora_B", (32, 2))]}
    torch.save(sd, tmp_path / "pytorch_adapter.bin")
    spec, _, _ = read_adapterhub_adapter(tmp_path)
    assert spec.targets == ("q", "v", "down")
    adapted = ga.import_adapterhub(tiny_llama(), tmp_path)
    got = adapted.get_parameter("adapters.a.layers.1.mlp.down_proj.lora_A")
    torch.testing.assert_close(got, sd["layers.1.mlp.down_proj.loras.a.lora_A"])


def _write_ah(path, cfg, sd):
    (path / "adapter_config.json").write_text(json.dumps({"config": cfg, "name": "a"}))
    torch.save(sd, path / "pytorch_adapter.bin")


def test_adapterhub_lora_keys_with_a_head_prefix_and_clear_mismatch_errors(tmp_path):
    cfg = {"architecture": "lora", "r": 2, "alpha": 4, "attn_matrices": ["q"]}
    sd = {f"bert.encoder.layer.{i}.attention.self.query.loras.a.{t}": torch.randn(s)
          for i in range(2) for t, s in (("lora_A", (2, 32)), ("lora_B", (32, 2)))}
    _write_ah(tmp_path, cfg, sd)  # saved from BertForSequenceClassification: "bert." prefix
    adapted = ga.import_adapterhub(tiny_bert(), tmp_path)
    torch.testing.assert_close(adapted.get_parameter("adapters.a.encoder.layer.1.attention.self.query.lora_B"),
                               sd["bert.encoder.layer.1.attention.self.query.loras.a.lora_B"])
    bad = dict(sd, **{"bert.encoder.layer.0.attention.self.query.loras.a.lora_A": torch.randn(3, 32)})
    _write_ah(tmp_path, cfg, bad)
    with pytest.raises(CheckpointError, match="does not fit"):
        ga.import_adapterhub(tiny_bert(), tmp_path)
    _write_ah(tmp_path, cfg, {k: v for k, v in sd.items() if ".layer.1." not in k})
    with pytest.raises(CheckpointError, match="2 graphadapt tensors not filled"):
        ga.import_adapterhub(tiny_bert(), tmp_path)


def test_peft_prompt_tuning_for_two_stacks_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "num_transformer_submodules": 2}))
    save_file({"prompt_embeddings": torch.randn(4, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="num_transformer_submodules=2"):
        ga.import_peft(tiny_bert(), tmp_path)
