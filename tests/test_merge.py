"""Merging LoRA into the base weights: ``AdaptedModel.merge / unmerge / to_base_model``.

For plain LoRA, rsLoRA, DoRA, two adapters on one layer (plain + DoRA chained) and fused
QKV slices (GPT-2 roles q, v), on BERT, GPT-2 and Llama: merged == unmerged (fp32 1e-5,
bf16 see BF16_ATOL), unmerge restores every weight bit-exactly, the merged graph has the
base graph's operators, and merge really changed the weights (merged != base).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from helpers import max_diff, randomize_lora, output_tensors, run_no_grad, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

ATOL = 1e-5
# bf16 (adapted.to(torch.bfloat16), then merge): folding rounds W + s·BA to bf16 once, where
# the unmerged graph rounds the base and LoRA products separately. Measured over the 12
# cases below: merged vs unmerged outputs max |diff| 1.6e-2 .. 3.9e-2 on outputs of max
# |y| ~ 3 (the same size as bf16-vs-fp32 of the unmerged model, 2.2e-2 .. 3.7e-2); merged
# bf16 weights vs fp32-merged weights max |diff| <= 0.97 % of max |W'| (~2.5 bf16 ulps).
BF16_ATOL = 0.08
BF16_WEIGHT_RTOL = 0.02

_ARCH = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
_METHODS = {
    "lora": lambda: {"a": ga.LoRA(r=8, alpha=16, targets=("q", "v", "down"))},
    "rslora": lambda: {"a": ga.LoRA(r=8, alpha=16, targets=("q", "v"), use_rslora=True)},
    "dora": lambda: {"a": ga.LoRA(r=8, alpha=16, targets=("q", "v", "o"), use_dora=True)},
    # two adapters on q (and v): plain, then DoRA, whose norm must use the un-merged W
    "two_on_q": lambda: {"a": ga.LoRA(r=8, alpha=16, targets=("q", "v")),
                         "b": ga.LoRA(r=4, alpha=8, targets=("q",), use_dora=True)},
}


# --------------------------------------------------------------------------- helpers




def _base_params(adapted) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapted.named_parameters() if not n.startswith("adapters.")}


def _assert_base_equal(adapted, snap) -> None:
    now = {n: p for n, p in adapted.named_parameters() if not n.startswith("adapters.")}
    assert set(now) == set(snap)
    for n, v in snap.items():
        assert now[n].dtype == v.dtype and torch.equal(now[n].detach(), v), n


def _changed(adapted, snap) -> set[str]:
    now = dict(adapted.named_parameters())
    return {n for n, v in snap.items() if not torch.equal(now[n].detach(), v)}


def _op_counts(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _call_modules(gm) -> list[str]:
    """Adapter calls in the graph (torch.export's own ``_guards_fn`` call is part of the base)."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]


def _all_call_modules(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")



@pytest.fixture(scope="module")
def bases():
    """Per architecture: a seeded tiny model and the call_function / call_module counts of its
    plain capture."""
    out = {}
    for arch, build in _ARCH.items():
        model = build()
        gm = ga.capture(model)
        out[arch] = (model, (_op_counts(gm), _all_call_modules(gm)))
    return out


# --------------------------------------------------------------------------- merge == unmerged
@pytest.mark.parametrize("method", list(_METHODS))
@pytest.mark.parametrize("arch", list(_ARCH))
def test_merge_matches_unmerged_and_unmerge_is_exact(bases, arch, method):
    model, base_ops = bases[arch]
    caller = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = ga.apply(model, ga.Spec(_METHODS[method](), seed=0)).eval()
    randomize_lora(adapted)
    if arch == "gpt2":  # roles q, v on the fused c_attn: slices, not the whole projection
        assert any(r.site.endswith("c_attn.q") for r in adapted.adapter_records)
        assert any(r.site.endswith("c_attn.v") for r in adapted.adapter_records)
    inputs = text_inputs(batch=3, seq=5, pad=2, seed=4)
    base_out = run_no_grad(model, inputs)
    before = run_no_grad(adapted, inputs)
    assert max_diff(before, base_out) > 1e-3
    snap = _base_params(adapted)
    graph_modules = _call_modules(adapted)
    assert len(graph_modules) == len(adapted.adapter_records)

    adapted_weights = {r.weight for r in adapted.adapter_records}
    report = adapted.merge()
    assert adapted.is_merged
    merged_w = {w: adapted.get_parameter(w).detach().clone() for w in adapted_weights}
    assert sorted(report.folded) == sorted(r.target for r in adapted.adapter_records)
    assert report.kept == {}
    merged = run_no_grad(adapted, inputs)
    assert max_diff(merged, before) <= ATOL
    assert max_diff(merged, base_out) > 1e-3  # fails if merge dropped the adapters
    # exactly the adapted weights changed (the biases are untouched)
    assert _changed(adapted, snap) == adapted_weights
    assert _op_counts(adapted) == base_ops[0]
    assert _call_modules(adapted) == [] and _all_call_modules(adapted) == base_ops[1]
    for n, p in model.named_parameters():  # merge() (not in place) leaves the caller alone
        assert torch.equal(p.detach(), caller[n]), n

    adapted.unmerge()
    assert not adapted.is_merged
    _assert_base_equal(adapted, snap)
    assert _call_modules(adapted) == graph_modules
    assert max_diff(run_no_grad(adapted, inputs), before) == 0

    # bf16: merge the bf16 model, compare with the bf16 unmerged model
    adapted.to(torch.bfloat16)
    snap16 = _base_params(adapted)
    before16 = run_no_grad(adapted, inputs)
    adapted.merge()
    merged16 = run_no_grad(adapted, inputs)
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(merged16) if t.is_floating_point())
    assert max_diff(merged16, before16) <= BF16_ATOL
    for w in adapted_weights:  # the bf16 fold is the fp32 fold, rounded
        scale = merged_w[w].abs().max()
        assert (adapted.get_parameter(w).float() - merged_w[w]).abs().max() <= BF16_WEIGHT_RTOL * scale, w
        assert (merged_w[w] - snap[w]).abs().max() > 2 * BF16_WEIGHT_RTOL * scale, w  # (so that can fail)
    adapted.unmerge()
    _assert_base_equal(adapted, snap16)


# --------------------------------------------------------------------------- to_base_model
@pytest.mark.parametrize("arch,spec", [
    ("bert", lambda: {"a": ga.LoRA(targets=("q", "v")), "d": ga.LoRA(targets=("o",), use_dora=True)}),
    # a module-path target on the fused c_attn: one LoRA on the whole projection
    ("gpt2", lambda: {"a": ga.LoRA(targets=("*.c_attn",)), "d": ga.LoRA(targets=("down",), use_dora=True)}),
    ("llama", lambda: {"a": ga.LoRA(targets=("all-linear",), use_rslora=True)}),
])
def test_to_base_model_save_load_round_trip(bases, arch, spec, tmp_path):
    model, _ = bases[arch]
    adapted = ga.apply(model, ga.Spec(spec())).eval()
    randomize_lora(adapted, std=0.2)
    inputs = text_inputs(batch=2, seq=7, pad=3, seed=9)
    unmerged = run_no_grad(adapted, inputs)

    plain = adapted.to_base_model()  # from the unmerged model: merges and unmerges internally
    assert not adapted.is_merged and max_diff(run_no_grad(adapted, inputs), unmerged) == 0
    assert type(plain) is type(model) and plain is not model
    adapted.merge()
    merged = run_no_grad(adapted, inputs)
    assert max_diff(merged, run_no_grad(model, inputs)) > 1e-3
    assert max_diff(run_no_grad(plain, inputs), merged) <= ATOL

    plain.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert max_diff(run_no_grad(loaded, inputs), merged) <= ATOL
    assert max_diff(run_no_grad(adapted.to_base_model(), inputs), merged) <= ATOL  # from the merged state


# --------------------------------------------------------------------------- caller's model, in place
def test_merge_in_place_changes_callers_model_and_unmerge_restores_it():
    model = tiny_bert()
    caller = {n: p.detach().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(targets=("q", "v")),
                                       "d": ga.LoRA(targets=("q", "up"), use_dora=True)})).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=3, seq=5, pad=2)
    base_out, before = run_no_grad(model, inputs), run_no_grad(adapted, inputs)
    snap = _base_params(adapted)

    adapted.merge()  # default: new tensors, the caller's weights untouched
    assert all(torch.equal(p.detach(), caller[n]) for n, p in model.named_parameters())
    assert max_diff(run_no_grad(model, inputs), base_out) == 0
    adapted.unmerge()

    adapted.merge(in_place=True)
    merged = run_no_grad(adapted, inputs)
    assert max_diff(merged, before) <= ATOL
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), caller[n])}
    assert changed == {r.weight for r in adapted.adapter_records}
    assert all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())  # written in place
    assert max_diff(run_no_grad(model, inputs), merged) <= ATOL  # the caller's model *is* the merged model now
    adapted.unmerge()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), caller[n]), n
    _assert_base_equal(adapted, snap)
    assert max_diff(run_no_grad(model, inputs), base_out) == 0
    assert max_diff(run_no_grad(adapted, inputs), before) == 0


# --------------------------------------------------------------------------- what cannot fold
def test_gated_lora_strict_raises_and_default_keeps_it():
    model = tiny_gpt2()
    adapted = ga.apply(model, ga.Spec({"g": ga.LoRA(targets=("q",), use_gating=True),
                                       "p": ga.LoRA(targets=("q", "v", "down"))})).eval()
    randomize_lora(adapted, std=0.2)
    inputs = text_inputs(batch=3, seq=5, pad=2)
    before = run_no_grad(adapted, inputs)
    snap = _base_params(adapted)
    graph_modules = _call_modules(adapted)
    gated = {r.target for r in adapted.adapter_records if r.adapter == "g"}
    plain = {r.target for r in adapted.adapter_records if r.adapter == "p"}
    assert gated and plain

    with pytest.raises(ga.MergeError) as e:
        adapted.merge(strict=True)
    assert all(t in str(e.value) for t in gated)
    assert not adapted.is_merged
    _assert_base_equal(adapted, snap)
    assert _call_modules(adapted) == graph_modules
    assert max_diff(run_no_grad(adapted, inputs), before) == 0
    with pytest.raises(ga.MergeError):
        adapted.to_base_model()
    assert not adapted.is_merged

    report = adapted.merge()
    assert set(report.folded) == plain
    assert set(report.kept) == gated
    assert all("depends on the input" in why for why in report.kept.values())
    assert "kept 2" in str(report)
    assert set(_call_modules(adapted)) == gated
    assert _changed(adapted, snap) == {r.weight for r in adapted.adapter_records if r.adapter == "p"}
    assert max_diff(run_no_grad(adapted, inputs), before) <= ATOL
    adapted.unmerge()
    _assert_base_equal(adapted, snap)
    assert max_diff(run_no_grad(adapted, inputs), before) == 0


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = tiny_llama()
    adapted = ga.apply(model, ga.LoRA(targets=("q", "v"))).eval()
    randomize_lora(adapted)
    inputs = text_inputs(batch=2, seq=6)
    before = run_no_grad(adapted, inputs)
    snap = _base_params(adapted)
    graph_modules = _call_modules(adapted)
    target = "adapters.default.layers.1.self_attn.v_proj"
    with torch.no_grad():
        adapted.get_submodule(target).lora_B[3, 2] = float("nan")
    with pytest.raises(ga.MergeError, match="non-finite") as e:
        adapted.merge()  # safe=True is the default
    assert target in str(e.value)
    assert not adapted.is_merged
    _assert_base_equal(adapted, snap)
    assert _call_modules(adapted) == graph_modules
    with torch.no_grad():
        adapted.get_submodule(target).lora_B[3, 2] = 0.0
    assert max_diff(run_no_grad(adapted, inputs), before) > 0  # (it was a live weight)
    # safe=False folds anyway; unmerge still restores the exact weights
    with torch.no_grad():
        adapted.get_submodule(target).lora_B[3, 2] = float("nan")
    adapted.merge(safe=False)
    assert _changed(adapted, snap)
    assert not torch.isfinite(adapted.get_parameter("layers.1.self_attn.v_proj.weight")).all()
    adapted.unmerge()
    _assert_base_equal(adapted, snap)


def test_partial_merge_next_to_unmerged_dora():
    """merge(names=[...]) must not fold into a weight that an unmerged DoRA on that layer still reads."""
    model = tiny_bert()
    adapted = ga.apply(model, ga.Spec({"p": ga.LoRA(targets=("q",)),
                                       "d": ga.LoRA(targets=("q",), use_dora=True)})).eval()
    randomize_lora(adapted, std=0.3)
    inputs = text_inputs(batch=3, seq=5, pad=2)
    before = run_no_grad(adapted, inputs)
    report = adapted.merge(names=["p"])
    assert max_diff(run_no_grad(adapted, inputs), before) <= ATOL
    assert not report.folded and any("DoRA" in why for why in report.kept.values())
