"""AdapterHub ``adapters`` 1.3.0 MTL-LoRA checkpoints (``mtl_lora`` / ``MTLLoRAConfig``) → graphadapt ``MTLLoRA``
(oracle venv), fp32 1e-5, BERT and Llama, one task's adapter active (AdapterHub's ``MultiTask`` block is not in
graphadapt yet). Every tensor (A, the stacked up projections, the task-specific singular values, the mixing
weights, the gate) is set non-zero random before ``save_adapter``; merge folds it exactly."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import MTLLoRAConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from helpers import tiny_bert, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "llama": tiny_llama}


@torch.no_grad()
def randomize(model, name="a", seed=17) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".loras.{name}." in f".{pname}":
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if pname.endswith(("values", "weights")) else 0.0))
            n += 1
    return n


CASES = {
    "bert-mtl": ("bert", MTLLoRAConfig(r=4, n_up_projection=3, weights_sharpness=0.5)),
    "bert-mtl-gated-ffn": ("bert", MTLLoRAConfig(r=2, n_up_projection=2, intermediate_lora=True, use_gating=True)),
    "llama-mtl": ("llama", MTLLoRAConfig(r=2, n_up_projection=2, attn_matrices=["q", "k", "v"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    kind, cfg = CASES[case]
    ah = BUILD[kind](seed=0)
    adapters.init(ah)
    ah.add_adapter("a", config=cfg)
    assert randomize(ah) > 0
    ah.set_active_adapters("a")
    ah.eval()
    ah.save_adapter(str(tmp_path), "a")
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, tmp_path).eval()
    assert isinstance(adapted.spec.adapters["a"], ga.MTLLoRA)
    x = oracle_inputs(kind)
    with torch.no_grad():
        want, got, plain = (m(**x).last_hidden_state for m in (ah, adapted, base))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2
    if not cfg.use_gating:
        adapted.merge()
        with torch.no_grad():
            # folding re-associates the products (W + ΔW) x: fp32 rounding, not 1e-5 exact on Llama
            torch.testing.assert_close(adapted(**x).last_hidden_state, want, atol=1e-4, rtol=1e-4)


def test_preset():
    assert from_adapterhub_config("mtl_lora") == from_adapterhub_config(
        adapters.AdapterConfig.load("mtl_lora").to_dict())
