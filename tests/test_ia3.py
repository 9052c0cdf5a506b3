"""IA3 (Liu et al., 2022) with PEFT semantics: spec, module, insertion pass, merge.

Output targets scale ``y`` by ``l`` ([out, 1]); ``feedforward`` targets scale the input
([1, in]). Checked against PEFT's ``IA3Config`` on tiny BERT and Llama, on GPT-2's fused QKV
(role ``v`` scales only v's channels), identity at init, merge == unmerged, merged graph has
the base graph's operators, unmerge is bit-exact.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from graphadapt.errors import SpecError  # noqa: E402
from graphadapt.methods.ia3.module import IA3Module  # noqa: E402
from graphadapt.methods.ia3 import IA3  # noqa: E402
from helpers import max_diff, run_no_grad, text_inputs, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

ATOL = 1e-5


def _apply(model, adapters: dict, seed: int = 0):
    return ga.apply(model, ga.Spec(adapters, seed=seed))


def _op_counts(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _adapter_calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]


def _base_params(adapted) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapted.named_parameters() if not n.startswith("adapters.")}


@torch.no_grad()
def _randomize(adapted, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in adapted.named_parameters():
        if n.endswith("ia3_l"):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- spec
def test_spec_validation_and_round_trip():
    s = IA3()
    assert s.targets == ("k", "v", "down") and s.feedforward == ("down",) and s.init_ia3_weights is True
    assert ga.MethodSpec.from_dict(s.to_dict()) == s
    assert IA3(targets="all-linear", feedforward=("down",)).role_targets() == (
        "q", "k", "v", "o", "up", "gate", "down", "router", "shared_expert_gate", "expert_up", "expert_gate", "expert_down",
        "q_a", "q_b", "kv_a", "kv_b", "mixer_in", "mixer_inner", "mixer_out")
    with pytest.raises(SpecError) as e:
        IA3(targets=("k", "v"), feedforward=("down",))
    assert e.value.field == "feedforward"
    with pytest.raises(SpecError) as e:
        IA3(targets=("k",), feedforward=("*.fc1",))
    assert e.value.field == "feedforward"
    with pytest.raises(SpecError):
        IA3(init_ia3_weights=1)


# --------------------------------------------------------------------------- module
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_module_forward_and_fold_fused_slice(feedforward, conv1d):
    g = torch.Generator().manual_seed(0)
    inp, total, (s, e) = 6, 12, (4, 8)
    w = torch.randn(total, inp, generator=g)
    b = torch.randn(total, generator=g)
    x = torch.randn(2, 3, inp, generator=g)
    mod = IA3Module(inp, e - s, feedforward=feedforward, fan_in_fan_out=conv1d, out_slice=(s, e), total_out=total)
    assert mod.ia3_l.shape == ((1, inp) if feedforward else (e - s, 1))
    with torch.no_grad():
        mod.ia3_l.copy_(1 + torch.randn(mod.ia3_l.shape, generator=g))
    base_w = w.t().contiguous() if conv1d else w
    y = torch.nn.functional.linear(x, w, b)
    out = mod(x, y, base_w, b)
    l = mod.ia3_l.detach().flatten()
    ref_slice = (torch.nn.functional.linear(x * l, w[s:e], b[s:e]) if feedforward else y[..., s:e] * l)
    assert torch.allclose(out[..., s:e], ref_slice, atol=1e-5)
    assert torch.equal(out[..., :s], y[..., :s]) and torch.equal(out[..., e:], y[..., e:])
    w2, b2 = mod.fold(base_w, b)
    assert w2.shape == base_w.shape and w2 is not base_w
    merged = torch.nn.functional.linear(x, w2.t() if conv1d else w2, b2)
    assert torch.allclose(merged, out, atol=1e-5)
    mod.active = False
    assert mod(x, y, base_w, b) is y


# --------------------------------------------------------------------------- apply
@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_identity_at_init(build):
    model = build()
    inputs = text_inputs(batch=2, seq=5, seed=1)
    adapted = _apply(model, {"a": IA3(targets=("v", "down"), feedforward=("down",))}).eval()
    assert adapted.adapter_records and all(r.method == "ia3" for r in adapted.adapter_records)
    assert max_diff(run_no_grad(adapted, inputs), run_no_grad(model, inputs)) <= 1e-6
    assert all(p.requires_grad == n.startswith("adapters.") for n, p in adapted.named_parameters())


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    model = tiny_bert()
    inputs = text_inputs(batch=2, seq=5, seed=1)
    rng = torch.get_rng_state()
    r1 = _apply(model, {"a": IA3(targets=("v", "down"), feedforward=("down",), init_ia3_weights=False)}, seed=3)
    r2 = _apply(model, {"a": IA3(targets=("v", "down"), feedforward=("down",), init_ia3_weights=False)}, seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    p1, p2 = dict(r1.named_parameters()), dict(r2.named_parameters())
    ia3 = [n for n in p1 if n.endswith("ia3_l")]
    assert ia3 and all(torch.equal(p1[n], p2[n]) for n in ia3)
    assert all(not torch.equal(p1[n], torch.ones_like(p1[n])) for n in ia3)
    assert max_diff(run_no_grad(r1.eval(), inputs), run_no_grad(model, inputs)) > 1e-3


def _peft_parity(build, peft_targets, peft_ff, ours: IA3):
    peft = pytest.importorskip("peft")
    model = build()
    pm = peft.get_peft_model(build(), peft.IA3Config(target_modules=peft_targets, feedforward_modules=peft_ff))
    pm.eval()
    g = torch.Generator().manual_seed(5)
    peft_l = {}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                path = n.removeprefix("base_model.model.").removesuffix(".ia3_l.default")
                peft_l[path] = p.detach().clone()
    adapted = _apply(model, {"a": ours}).eval()
    ours_params = dict(adapted.named_parameters())
    assert sorted(f"adapters.a.{p}.ia3_l" for p in peft_l) == sorted(n for n in ours_params if n.endswith("ia3_l"))
    with torch.no_grad():
        for path, v in peft_l.items():
            ours_params[f"adapters.a.{path}.ia3_l"].copy_(v)  # same shapes as PEFT: no reshaping
    inputs = text_inputs(batch=3, seq=6, pad=2, seed=2)
    out, ref = run_no_grad(adapted, inputs), run_no_grad(pm, inputs)
    assert max_diff(out, ref) <= ATOL
    assert max_diff(out, run_no_grad(model, inputs)) > 1e-3
    return adapted


def test_parity_with_peft_bert():
    _peft_parity(tiny_bert, r"encoder\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
                 r"encoder\.layer\.\d+\.output\.dense", IA3(targets=("k", "v", "down"), feedforward=("down",)))


def test_parity_with_peft_llama_down_feedforward():
    adapted = _peft_parity(tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"],
                           IA3(targets=("k", "v", "down"), feedforward=("down",)))
    ff = {r.target: adapted.get_submodule(r.target).feedforward for r in adapted.adapter_records}
    assert all(v == t.endswith("down_proj") for t, v in ff.items())


def test_parity_with_peft_gpt2_path_targets_conv1d():
    # the whole fused c_attn (path selector) and mlp.c_proj as feedforward: Conv1D layout both ways
    _peft_parity(tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"],
                 IA3(targets=("*.attn.c_attn", "*.mlp.c_proj"), feedforward=("*.mlp.c_proj",)))


# --------------------------------------------------------------------------- merge
_MERGE_CASES = {
    "bert": (tiny_bert, lambda: {"a": IA3(targets=("k", "v", "down"), feedforward=("down",))}),
    "llama": (tiny_llama, lambda: {"a": IA3(targets=("k", "v", "down"), feedforward=("down",))}),
    "gpt2_v": (tiny_gpt2, lambda: {"a": IA3(targets=("v", "down"), feedforward=("down",))}),
    # IA3 stacked after a LoRA on the same layers (feedforward folds with the un-merged base W)
    "lora_then_ia3": (tiny_llama, lambda: {"l": ga.LoRA(r=4, targets=("v", "down")),
                                           "a": IA3(targets=("v", "down"), feedforward=("down",))}),
}


@pytest.mark.parametrize("case", list(_MERGE_CASES))
def test_merge_matches_unmerged_and_unmerge_is_exact(case):
    build, adapters = _MERGE_CASES[case]
    model = build()
    base_ops = _op_counts(ga.capture(model))
    adapted = _apply(model, adapters()).eval()
    _randomize(adapted)
    if case == "lora_then_ia3":
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in adapted.named_parameters():
                if n.endswith(("lora_A", "lora_B")):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    inputs = text_inputs(batch=3, seq=5, pad=2, seed=4)
    base_out = run_no_grad(model, inputs)
    before = run_no_grad(adapted, inputs)
    assert max_diff(before, base_out) > 1e-3
    snap = _base_params(adapted)
    calls = _adapter_calls(adapted)
    report = adapted.merge()
    assert report.kept == {} and sorted(report.folded) == sorted({r.target for r in adapted.adapter_records})
    merged = run_no_grad(adapted, inputs)
    assert max_diff(merged, before) <= ATOL
    assert max_diff(merged, base_out) > 1e-3
    assert _op_counts(adapted) == base_ops and _adapter_calls(adapted) == []
    adapted.unmerge()
    now = _base_params(adapted)
    assert all(torch.equal(now[n], v) for n, v in snap.items())
    assert _adapter_calls(adapted) == calls
    assert max_diff(run_no_grad(adapted, inputs), before) == 0


def test_gpt2_fused_v_scales_only_v_channels():
    model = tiny_gpt2()
    adapted = _apply(model, {"a": IA3(targets=("v",), feedforward=())}).eval()
    recs = adapted.adapter_records
    assert recs and all(r.site.endswith("c_attn.v") for r in recs)
    _randomize(adapted)
    hidden = model.config.n_embd
    w_name = recs[0].weight
    b_name = recs[0].bias
    w0, b0 = adapted.get_parameter(w_name).detach().clone(), adapted.get_parameter(b_name).detach().clone()
    inputs = text_inputs(batch=2, seq=5, seed=3)
    before = run_no_grad(adapted, inputs)
    assert max_diff(before, run_no_grad(model, inputs)) > 1e-3
    adapted.merge()
    assert max_diff(run_no_grad(adapted, inputs), before) <= ATOL
    w1, b1 = adapted.get_parameter(w_name).detach(), adapted.get_parameter(b_name).detach()
    # Conv1D weight [in, 3*hidden]: q and k columns untouched, v columns scaled by l
    assert torch.equal(w1[:, : 2 * hidden], w0[:, : 2 * hidden]) and torch.equal(b1[: 2 * hidden], b0[: 2 * hidden])
    l = adapted.get_submodule(recs[0].target).ia3_l.detach().flatten()
    assert torch.allclose(w1[:, 2 * hidden:], w0[:, 2 * hidden:] * l) and torch.allclose(b1[2 * hidden:], b0[2 * hidden:] * l)
    assert not torch.equal(w1[:, 2 * hidden:], w0[:, 2 * hidden:])


def test_ia3_checkpoint_and_export(tmp_path):
    model = tiny_bert()
    adapted = _apply(model, {"a": IA3(targets=("k", "v", "down"), feedforward=("down",))}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("ia3_l"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    x = text_inputs(3, 6)
    y = adapted(**x)
    adapted.save_adapters(tmp_path / "ckpt")
    assert max_diff(ga.load(tiny_bert(), tmp_path / "ckpt")(**x), y) == 0.0
    base = ga.export_onnx(ga.capture(model), tmp_path / "base.onnx", verify=False)
    # the base capture's inputs (by default an adapted BERT export also takes token_type_ids)
    ex = adapted.example_inputs()
    merged = ga.export_onnx(adapted, tmp_path / "merged.onnx", example_inputs=ex, merge=True, verify=True)
    unmerged = ga.export_onnx(adapted, tmp_path / "unmerged.onnx", example_inputs=ex, merge=False, verify=True)
    assert merged.node_count == base.node_count < unmerged.node_count


def test_training_reaches_only_the_scalings_and_lowers_the_loss():
    """IA3 on k, v and (input-scaled) down of a tiny Llama LM: gradients reach the scaling vectors only, a few
    AdamW steps lower the loss, the base weights are unchanged."""
    model = tiny_llama(causal_lm=True)
    adapted = ga.apply(model, IA3(targets=("k", "v", "down"), feedforward=("down",))).train()
    before = _base_params(adapted)
    batch = text_inputs(4, 8)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapters.") for n, p in adapted.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=5e-2)
    losses = []
    for _ in range(6):
        out = adapted(**batch, labels=batch["input_ids"])
        out.loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = _base_params(adapted)
    assert all(torch.equal(before[k], after[k]) for k in before)
