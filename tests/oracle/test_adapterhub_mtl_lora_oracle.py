"""AdapterHub ``adapters`` 1.3.0 MTL-LoRA checkpoints (``mtl_lora`` / ``MTLLoRAConfig``) → graphadapt ``MTLLoRA``
(oracle venv), fp32 1e-5, BERT and Llama: one task's adapter active, and several tasks under AdapterHub's
``MultiTask`` block (rows routed by ``task_ids``, A and up projections shared by ``share_parameters``). Every tensor (A, the stacked up projections, the task-specific singular values, the mixing
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


# --------------------------------------------------------------------------- MultiTask (rows routed by task_ids)
from graphadapt.contract import InputError  # noqa: E402

TASKS = ("t0", "t1", "t2")
MT_CASES = {
    "bert": MTLLoRAConfig(r=4, n_up_projection=3, weights_sharpness=0.5),
    "llama": MTLLoRAConfig(r=2, n_up_projection=2, attn_matrices=["q", "k", "v"], weights_sharpness=0.5),
}


@torch.no_grad()
def _randomize_task(model, name, seed) -> int:
    """Non-zero task tensors (Λ, the mixing weights); with ``shared`` also A and the up projections (shared by
    every task after ``share_parameters``: one parameter object, set once)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        if f".loras.{name}." in f".{pname}":
            if pname.endswith(("values", "weights")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            n += 1
    return n


@pytest.mark.parametrize("kind", list(MT_CASES))
def test_multitask_matches_adapterhub(kind, tmp_path):
    """AdapterHub: three MTL-LoRA tasks with ``share_parameters(MultiTask(...))`` (A and the up projections shared,
    Λ and the mixing weights per task), ``set_active_adapters(MultiTask(...))``, ``forward(..., task_ids=...)``.
    graphadapt: each task's ``save_adapter`` directory imported into one model, ``set_active(ga.MultiTask(...))``."""
    ah = BUILD[kind](seed=0)
    adapters.init(ah)
    for t in TASKS:
        ah.add_adapter(t, config=MT_CASES[kind])
    _randomize_task(ah, "t0", seed=3)  # shared tensors first (t0 is the reference), then per-task ones
    ah.share_parameters(adapters.MultiTask(*TASKS))
    with torch.no_grad():
        for i, t in enumerate(TASKS):
            g = torch.Generator().manual_seed(10 + i)
            for pname, p in ah.named_parameters(remove_duplicate=False):
                if f".loras.{t}." in f".{pname}" and pname.endswith(("values", "weights")):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    ah.set_active_adapters(adapters.MultiTask(*TASKS))
    ah.eval()
    for t in TASKS:
        ah.save_adapter(str(tmp_path / t), t)
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, [tmp_path / t for t in TASKS], active=ga.MultiTask(*TASKS)).eval()
    x = oracle_inputs(kind)
    rows = x["input_ids"].shape[0]
    for ids in (torch.tensor([2, 0, 1][:rows]), torch.tensor([1, 1, 0][:rows])):
        with torch.no_grad():
            want = ah(**x, task_ids=ids).last_hidden_state
            got = adapted(**x, task_ids=ids).last_hidden_state
            plain = base(**x).last_hidden_state
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert (got - plain).abs().amax(dim=(1, 2)).min() > 1e-3  # every row's task changes it
    # the tasks differ: row 0 under task 2 is not row 0 under task 1
    with torch.no_grad():
        a = adapted(**x, task_ids=torch.tensor([2, 0, 1][:rows])).last_hidden_state
        b = adapted(**x, task_ids=torch.tensor([1, 0, 1][:rows])).last_hidden_state
    assert (a[0] - b[0]).abs().max() > 1e-3
    with pytest.raises(InputError, match="task_ids holds 3"):
        adapted(**x, task_ids=torch.tensor([0, 3, 0][:rows]))
