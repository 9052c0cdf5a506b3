"""Memory options of merge and the streaming / low-memory outputs (docs/scale.md).

Irreversible in-place merge (``merge(in_place=True, keep_backup=False)``), overflow handling
of the in-place modes, ``save_merged`` round trips through ``from_pretrained`` and the
export's low-memory path (no fp32 copy of a half model, peak memory in the report).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from helpers import max_diff, randomize_lora, run_no_grad, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

ATOL = 1e-5


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- merge modes
def test_irreversible_in_place_merge_writes_callers_storage_and_refuses_unmerge():
    model = tiny_llama()
    caller = _params(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    adapted = ga.apply(model, ga.LoRA(targets=("q", "v", "down"))).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=2, seq=6)
    before = run_no_grad(adapted, inputs)

    report = adapted.merge(in_place=True, keep_backup=False)
    assert len(report.folded) == 6 and adapted.is_merged
    assert max_diff(run_no_grad(adapted, inputs), before) <= ATOL
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), caller[n])}
    assert changed == {r["weight"] for r in adapted.adapter_records}
    assert all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())  # no new storage
    assert not adapted._merge_state["backups"]  # nothing kept
    assert max_diff(run_no_grad(model, inputs), before) <= ATOL  # the caller's model is merged
    with pytest.raises(ga.MergeError, match="without a backup"):
        adapted.unmerge()
    with pytest.raises(ga.MergeError, match="without a backup"):
        adapted.merge()
    with pytest.raises(ga.MergeError, match="in_place=True"):
        ga.apply(tiny_llama(), ga.LoRA()).merge(keep_backup=False)


def test_irreversible_merge_refuses_nan_adapter_before_writing():
    model = tiny_llama()
    caller = _params(model)
    adapted = ga.apply(model, ga.LoRA(targets=("q", "v"))).eval()
    randomize_lora(adapted)
    target = "adapters.default.layers.1.self_attn.v_proj"
    with torch.no_grad():
        adapted.get_submodule(target).lora_A[0, 1] = float("inf")
    with pytest.raises(ga.MergeError, match="non-finite") as e:
        adapted.merge(in_place=True, keep_backup=False)
    assert target in str(e.value) and not adapted.is_merged
    assert all(torch.equal(p.detach(), caller[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("keep_backup", [True, False])
def test_in_place_merge_overflow_never_installs_non_finite(keep_backup):
    """Finite factors whose fold overflows fp16: reversible in place restores every weight,
    irreversible stops before writing the bad one and names the weights it already merged."""
    model = tiny_llama().to(torch.float16)
    caller = _params(model)
    adapted = ga.apply(model, ga.LoRA(targets=("q",), r=2, alpha=2)).eval()
    randomize_lora(adapted)
    last = adapted.adapter_records[-1]["target"]
    with torch.no_grad():
        mod = adapted.get_submodule(last)
        mod.lora_A.fill_(300.0)
        mod.lora_B.fill_(300.0)  # 2 · 300 · 300 = 180000 > fp16 max
    with pytest.raises(ga.MergeError, match="non-finite") as e:
        adapted.merge(in_place=True, keep_backup=keep_backup)
    assert not adapted.is_merged
    now = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in now.values())
    first_w = adapted.adapter_records[0]["weight"]
    if keep_backup:
        assert all(torch.equal(now[n].detach(), v) for n, v in caller.items())
    else:
        assert "your model changed" in str(e.value) and first_w in str(e.value)
        assert not torch.equal(now[first_w].detach(), caller[first_w])  # merged before the failure
        assert torch.equal(now[adapted.adapter_records[-1]["weight"]].detach(),
                           caller[adapted.adapter_records[-1]["weight"]])  # the bad one untouched
