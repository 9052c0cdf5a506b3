"""AdapterHub ``adapters`` 1.3.0 DoRA checkpoints (``dora`` / ``DoRAConfig``) → graphadapt
``LoRA(use_dora=True, dora_form="adapterhub")`` (oracle venv), fp32 1e-5, BERT and Llama (AdapterHub's DoRA fails
on GPT-2's transposed Conv1D weights). Every tensor (``lora_A``, ``lora_B``, the magnitude ``m``) is set non-zero
random before ``save_adapter``; merge folds it exactly."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import DoRAConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from helpers import tiny_bert, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "llama": tiny_llama}


@torch.no_grad()
def randomize(model, name="a", seed=13) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".loras.{name}." in f".{pname}":
            p.copy_((1.0 if pname.endswith("m.weight") else 0.0) * p + 0.3 * torch.randn(p.shape, generator=g))
            n += 1
    return n


CASES = {
    "bert-dora": ("bert", DoRAConfig(r=4, alpha=16)),
    "bert-dora-ffn-dropout": ("bert", DoRAConfig(r=2, intermediate_lora=True, output_lora=True, dropout=0.1)),
    "llama-dora": ("llama", DoRAConfig(r=2, attn_matrices=["q", "k", "v"])),
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
    spec = adapted.spec.adapters["a"]
    assert isinstance(spec, ga.LoRA) and spec.use_dora and spec.dora_form == "adapterhub"
    x = oracle_inputs(kind)
    with torch.no_grad():
        want, got, plain = (m(**x).last_hidden_state for m in (ah, adapted, base))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2
    adapted.merge()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).last_hidden_state, want, atol=ATOL, rtol=RTOL)


def test_preset():
    spec = from_adapterhub_config("dora")
    assert spec == from_adapterhub_config(adapters.AdapterConfig.load("dora").to_dict())
    assert spec.use_dora and spec.dora_form == "adapterhub"
