"""AdapterHub ``adapters`` 1.3.0 LoRA and IA3 checkpoints → graphadapt (oracle venv), fp32 1e-5.

Each importer case: a tiny seeded model gets AdapterHub adapter ``"a"``, every LoRA/IA3 tensor is set non-zero
random, ``save_adapter`` writes it and ``import_adapterhub`` loads it onto an untouched copy of the base model.
The weight-copy cases apply graphadapt's own spec and copy AdapterHub's tensors in by hand.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import IA3Config, LoRAConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


@torch.no_grad()
def randomize_loras(model, name="a", seed=1) -> int:
    """Non-zero random LoRA/IA3/gate tensors (IA3 vectors around 1)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".loras.{name}." not in f".{pname}":
            continue
        ia3 = pname.endswith("lora_B") and p.shape[-1] == 1
        p.copy_(0.5 + torch.rand(p.shape, generator=g) if ia3 else 0.3 * torch.randn(p.shape, generator=g))
        n += 1
    return n


def _ah(build, cfg):
    m = build(seed=0)
    adapters.init(m)
    m.add_adapter("a", config=cfg)
    assert randomize_loras(m) > 0
    m.set_active_adapters("a")
    return m.eval()


def _check(adapted, ah, base, kind):
    x = oracle_inputs(kind)
    with torch.no_grad():
        want, got, plain = (m(**x).last_hidden_state for m in (ah, adapted.eval(), base))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2  # the adapter does something


CASES = {
    "bert-lora-ffn": ("bert", LoRAConfig(r=4, alpha=16, intermediate_lora=True, output_lora=True)),
    "bert-lora-qkv-gated-leaveout": ("bert", LoRAConfig(attn_matrices=["q", "k", "v"], use_gating=True, leave_out=[1])),
    "gpt2-lora-fused-gated-ffn": ("gpt2", LoRAConfig(r=2, intermediate_lora=True, output_lora=True, use_gating=True)),
    "llama-lora-intermediate": ("llama", LoRAConfig(r=2, intermediate_lora=True)),
    "bert-ia3": ("bert", IA3Config()),
    "bert-ia3-alpha-output": ("bert", IA3Config(alpha=3, output_lora=True)),
    "gpt2-ia3-gated": ("gpt2", IA3Config(use_gating=True, output_lora=True)),
}
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    kind, cfg = CASES[case]
    ah = _ah(BUILD[kind], cfg)
    ah.save_adapter(str(tmp_path), "a")
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, tmp_path)
    spec = adapted.spec.adapters["a"]
    assert isinstance(spec, ga.IA3 if cfg.composition_mode == "scale" else ga.LoRA)
    n_ah = sum(1 for n, _ in ah.named_modules() if n.endswith(".loras.a"))
    assert len({r.site.rsplit(".", 1)[0] if r.site.endswith((".q", ".k", ".v")) else r.site
                for r in adapted.adapter_records}) == n_ah
    _check(adapted, ah, base, kind)


def test_weight_copy_bert_lora_ffn():
    """graphadapt's own LoRA spec (no importer) with AdapterHub's tensors copied per module path."""
    ah = _ah(tiny_bert, LoRAConfig(r=4, alpha=16, intermediate_lora=True, output_lora=True, use_gating=True))
    base = tiny_bert(seed=0)
    adapted = ga.apply(base, ga.Spec({"a": ga.LoRA(r=4, alpha=16, targets=("q", "v", "up", "down"), use_gating=True)}))
    sd = ah.state_dict()
    with torch.no_grad():
        for r in adapted.adapter_records:
            mod = adapted.get_submodule(r.target)
            src = f"{r.site}.loras.a."
            mod.lora_A.copy_(sd[src + "lora_A"])
            mod.lora_B.copy_(sd[src + "lora_B"])
            mod.gate.weight.copy_(sd[src + "gate.weight"])
            mod.gate.bias.copy_(sd[src + "gate.bias"])
    _check(adapted, ah, base, "bert")


def test_weight_copy_bert_ia3():
    """AdapterHub IA3 = graphadapt IA3(feedforward=(), alpha=…): every site scales its output, l = lora_B."""
    ah = _ah(tiny_bert, IA3Config(alpha=2, output_lora=True))
    base = tiny_bert(seed=0)
    adapted = ga.apply(base, ga.Spec({"a": ga.IA3(targets=("k", "v", "up", "down"), feedforward=(), alpha=2)}))
    sd = ah.state_dict()
    with torch.no_grad():
        for r in adapted.adapter_records:
            adapted.get_submodule(r.target).ia3_l.copy_(sd[f"{r.site}.loras.a.lora_B"])
    _check(adapted, ah, base, "bert")
    adapted.merge()  # AdapterHub's (non-gated) IA3 folds too
    _check(adapted, ah, base, "bert")


@pytest.mark.parametrize("preset,cls", [("lora", LoRAConfig), ("ia3", IA3Config)])
def test_presets_equal_adapterhub_configs(preset, cls):
    """The preset names and AdapterHub's own default config dicts translate to the same spec."""
    assert from_adapterhub_config(preset) == from_adapterhub_config(cls().to_dict())
    assert from_adapterhub_config(adapters.AdapterConfig.load(preset).to_dict()) == from_adapterhub_config(preset)
