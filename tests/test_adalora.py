"""AdaLoRA: the rank allocator prunes exactly as PEFT's, trained checkpoints import with PEFT's outputs, merge works."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import graphadapt as ga
from graphadapt import import_peft
from graphadapt.methods.adalora import RankAllocator, orth_regularization

from helpers import max_diff, text_inputs, tiny_llama

SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)
OURS_KIND = {"lora_A": "svd_A", "lora_E": "svd_E", "lora_B": "svd_B"}


def _peft_to_ours(name: str) -> str:
    path, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
    return f"adapters.default.{path}.{OURS_KIND['lora_' + rest.split('.')[0]]}"


def test_allocator_equals_peft_and_trained_checkpoint_imports(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), AdaLoraConfig(lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        **SCHEDULE))
    ours = ga.apply(tiny_llama(), ga.AdaLoRA(alpha=8, targets=("q", "v"), **SCHEDULE))
    mine = dict(ours.named_parameters())
    pairs = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                q = mine[_peft_to_ours(n)]
                q.copy_(p)
                pairs.append((p, q))
    assert len(pairs) == 12
    alloc = RankAllocator(ours, "default")
    for step in range(1, SCHEDULE["total_step"] + 1):
        for p, q in pairs:   # the same gradients on both sides: the allocator's decisions are compared exactly
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        pm.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        for p, q in pairs:
            assert torch.equal(p, q), step
    kept = {k: sum(v) for k, v in alloc.rank_pattern.items()}
    assert sum(kept.values()) == SCHEDULE["target_r"] * 4 and len(set(kept.values())) > 1   # uneven: it allocated
    assert alloc.rank_pattern == {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}

    x = text_inputs(3, 6, pad=2)
    pm.eval()
    with torch.no_grad():
        ref = pm(**x).last_hidden_state
        with pm.disable_adapter():
            plain = pm(**x).last_hidden_state
        assert max_diff(ours.eval()(**x).last_hidden_state, ref) < 1e-5
    pm.save_pretrained(tmp_path)
    adapted = import_peft(tiny_llama(), tmp_path)
    ranks = {r.site: adapted.get_submodule(r.target).r for r in adapted.adapter_records}
    assert sum(ranks.values()) == 8 and max(ranks.values()) < 6   # the checkpoint holds only the kept triplets
    with torch.no_grad():
        got = adapted(**x).last_hidden_state
    assert max_diff(got, ref) < 1e-5 and max_diff(got, plain) > 1e-3
    adapted.merge()
    with torch.no_grad():
        assert max_diff(adapted(**x).last_hidden_state, ref) < 1e-5
    adapted.unmerge()

    # the orthogonality regulariser (PEFT adds it to outputs.loss in its forward)
    covs = [p @ p.T if ".lora_A." in n else p.T @ p for n, p in pm.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    terms = [torch.norm(c - torch.eye(c.shape[0]), p="fro") for c in covs]
    want = 0.5 * sum(terms) / len(terms)
    assert abs(orth_regularization(ours, "default").item() - want.item()) < 1e-5

    # our own trained adapter, finalised: factors cut to the kept triplets, the pattern in the spec; saved and
    # reloaded it gives the same outputs
    ranks = alloc.finalise()
    assert sum(ranks.values()) == 8
    with torch.no_grad():
        assert max_diff(ours(**x).last_hidden_state, ref) < 1e-5
    ours.save_adapters(tmp_path / "ours")
    again = ga.load(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        assert max_diff(again(**x).last_hidden_state, ref) < 1e-5


def test_adalora_trains_and_refuses_bad_schedules():
    ours = ga.apply(tiny_llama(), ga.AdaLoRA(init_r=4, target_r=2, targets=("q",), total_step=5, tinit=1))
    ours.train()
    params = [p for n, p in ours.named_parameters() if p.requires_grad]
    assert params and all(n.startswith("adapters.") for n, p in ours.named_parameters() if p.requires_grad)
    out = ours(**text_inputs(2, 5)).last_hidden_state
    (out.pow(2).mean() + orth_regularization(ours, "default")).backward()
    assert all(p.grad is not None for p in params)
    alloc = RankAllocator(ours, "default")
    assert alloc.update_and_allocate(1) is None   # warm-up
    assert alloc.update_and_allocate(2) is not None   # the budget shrinks
    with pytest.raises(ga.SpecError, match="no budgeting phase"):
        ga.AdaLoRA(total_step=3, tinit=2, tfinal=1)
    with pytest.raises(ga.GraphAdaptError, match="not an AdaLoRA adapter"):
        RankAllocator(ours, "nope")
