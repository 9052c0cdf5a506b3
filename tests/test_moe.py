"""Mixture-of-experts models (transformers 5: fused 3-d expert weights run through grouped_mm).

Mixtral-style (router + experts) and Qwen2-MoE (DeepSeek-style shared expert with a scalar gate),
built from configs (hidden 32, 2 layers, 4 experts, top-2): recognition, LoRA on attention and
experts plus a bottleneck adapter after the MoE block, merge/unmerge, ONNX, PEFT parity.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.errors import SpecError
from tests.helpers import build_seeded, perturb_adapters, text_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, max_position_embeddings=64)


def tiny_mixtral(seed=0):
    cfg = T.MixtralConfig(intermediate_size=64, num_local_experts=4, **_COMMON)
    return build_seeded(lambda: T.MixtralModel(cfg), seed)


def tiny_qwen_moe(seed=0):
    cfg = T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                           num_experts=4, **_COMMON)
    return build_seeded(lambda: T.Qwen2MoeModel(cfg), seed)


def _out(m, inp):
    with torch.no_grad():
        return m(**inp).last_hidden_state


def _rows(report):
    return [(L["index"], r["block"], r["role"], r.get("module"), r.get("placement"), r.get("norm_module"))
            for L in report["layers"] for r in L["sites"]]


INP = text_inputs(2, 7, pad=2)
SPEC = dict(lora=lambda: ga.LoRA(r=4, alpha=8, targets=("q", "v", "router", "expert_gate", "expert_up", "expert_down")),
            bn=lambda: ga.SeqBn(reduction_factor=4, init_weights="mam_adapter"))


@pytest.fixture(scope="module")
def mixtral():
    return tiny_mixtral()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_moe()


# ----------------------------------------------------------------------------- recognition
def test_mixtral_structure_router_experts_residual(adapted_mixtral):
    rep = adapted_mixtral[0].structure_report
    rows = _rows(rep)
    for layer in (0, 1):
        mine = {r[2]: r for r in rows if r[0] == layer and r[1] == "moe"}
        assert set(mine) == {"router", "expert_gate", "expert_up", "expert_down", "residual"}
        assert mine["router"][3] == f"layers.{layer}.mlp.gate"
        assert mine["expert_gate"][3] == f"layers.{layer}.mlp.experts.gate_up_proj.expert_gate"
        assert mine["expert_down"][3] == f"layers.{layer}.mlp.experts.down_proj"
        assert mine["residual"][4:] == ("pre_ln", f"layers.{layer}.post_attention_layernorm")
    shapes = {r["role"]: r["shape"] for r in rep["layers"][0]["sites"] if r["block"] == "moe" and "shape" in r}
    assert shapes["expert_gate"] == "32→64 (of 128) ×4 experts" and shapes["expert_down"] == "64→32 ×4 experts"
    # nothing MoE-related is left over: the router is placed, its softmax is not an attention candidate
    assert not [u for u in rep["unmatched"] if "mlp" in u["where"] or u["what"] == "attention"], rep["unmatched"]
    assert "moe" in str(rep) and "expert_up" in str(rep)
    why = rep.why("ffn", layer=1)
    assert "pattern moe matched" in why and "layers.1.mlp.experts.down_proj" in why, why


def test_shared_expert_structure(adapted_qwen):
    rows = _rows(adapted_qwen[0].structure_report)
    mine = {r[2]: r[3] for r in rows if r[0] == 1 and r[1] == "moe"}
    assert mine["up"] == "layers.1.mlp.shared_expert.up_proj"
    assert mine["gate"] == "layers.1.mlp.shared_expert.gate_proj"
    assert mine["down"] == "layers.1.mlp.shared_expert.down_proj"
    assert mine["shared_expert_gate"] == "layers.1.mlp.shared_expert_gate"
    assert mine["router"] == "layers.1.mlp.gate"
    assert {"expert_gate", "expert_up", "expert_down", "residual"} <= set(mine)


# ----------------------------------------------------------------------------- LoRA + bottleneck
@pytest.fixture(scope="module")
def adapted_mixtral(mixtral):
    base = _out(mixtral, INP)
    a = ga.apply(mixtral, ga.Spec({"l": SPEC["lora"](), "bn": SPEC["bn"]()}))
    init = _out(a, INP)
    perturb_adapters(a, seed=1, replace=True)
    return a, base, init


def test_lora_and_bottleneck_on_moe(adapted_mixtral):
    a, base, init = adapted_mixtral
    torch.testing.assert_close(init, base, atol=0, rtol=0)          # identity at init
    names = {n for n, _ in a.named_modules() if n.startswith("adapters.")}
    assert "adapters.l.layers.0.mlp.experts.gate_up_proj.expert_gate" in names
    assert "adapters.l.layers.1.mlp.experts.down_proj" in names
    assert "adapters.l.layers.0.mlp.gate" in names
    assert any(n.startswith("adapters.bn.") for n in names)
    out = _out(a, INP)
    assert (out - base).abs().max() > 1e-2                           # the adapters do something
    # each part alone changes the output: experts' LoRA and the bottleneck after the MoE block
    for name in ("adapters.l.layers.1.mlp.experts.down_proj", "adapters.bn"):
        mods = [m for n, m in a.named_modules() if n.startswith(name) and hasattr(m, "active")]
        for m in mods:
            m.active = False
        assert (_out(a, INP) - out).abs().max() > 1e-4, name
        for m in mods:
            m.active = True


def test_expert_lora_trains(adapted_mixtral):
    """Gradients reach every expert's LoRA factors through the grouped expert products."""
    a, _, _ = adapted_mixtral
    mod = a.get_submodule("adapters.l.layers.0.mlp.experts.gate_up_proj.expert_up")
    a.zero_grad(set_to_none=True)
    a(**INP).last_hidden_state.square().mean().backward()
    grad_a = mod.lora_A.grad.view(4, 4, -1)     # [experts, r, in]
    assert all(grad_a[e].abs().sum() > 0 for e in range(4))
    assert all(p.grad is None for n, p in a.named_parameters() if not n.startswith("adapters."))
    a.zero_grad(set_to_none=True)


def test_moe_merge_unmerge_exact(adapted_mixtral, mixtral):
    a, base, _ = adapted_mixtral
    out = _out(a, INP)
    w0 = a.get_parameter("layers.0.mlp.experts.gate_up_proj")
    w0_copy = w0.detach().clone()
    a.merge()
    try:
        assert not any(n.startswith("adapters.l.") for n in (str(x.target) for x in a.graph.nodes
                                                             if x.op == "call_module"))
        merged_w = a.get_parameter("layers.0.mlp.experts.gate_up_proj")
        assert merged_w.shape == (4, 128, 32) and (merged_w - w0_copy).abs().max() > 0
        torch.testing.assert_close(_out(a, INP), out, atol=1e-5, rtol=0)
    finally:
        a.unmerge()
    hf = a.to_base_model(names=["l"])   # merged copy of the HF class: the 3-d expert weights carry the LoRA
    assert type(hf) is type(mixtral) and hf is not mixtral
    torch.testing.assert_close(hf.layers[0].mlp.experts.gate_up_proj.detach(), merged_w.detach())
    with torch.no_grad():
        hf_out = hf(**INP).last_hidden_state
    # the bottleneck adapter is not foldable, so compare against the model without it
    bn = [m for n, m in a.named_modules() if n.startswith("adapters.bn.") and hasattr(m, "active")]
    for m in bn:
        m.active = False
    torch.testing.assert_close(hf_out, _out(a, INP), atol=1e-5, rtol=0)
    for m in bn:
        m.active = True
    assert torch.equal(a.get_parameter("layers.0.mlp.experts.gate_up_proj"), w0_copy)
    assert torch.equal(mixtral.layers[0].mlp.experts.gate_up_proj, w0_copy)     # caller's model untouched
    torch.testing.assert_close(_out(a, INP), out, atol=0, rtol=0)


def test_moe_onnx_export_matches_pytorch(adapted_mixtral, tmp_path):
    """One export (unmerged: the expert LoRA modules and the lowered grouped_mm both go to ONNX)."""
    onnx = pytest.importorskip("onnx")
    a, _, _ = adapted_mixtral
    rep = ga.export_onnx(a, tmp_path / "moe.onnx", merge=False)
    assert rep.verified and max(rep.max_abs_diff.values()) < 1e-4
    model = onnx.load(str(tmp_path / "moe.onnx"))
    domains = {n.domain for n in model.graph.node}
    assert not any("transformers" in d for d in domains), domains
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    other = text_inputs(3, 13, seed=5, pad=3)                      # unseen batch and sequence
    got = sess.run(None, {k: v.numpy() for k, v in other.items()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _out(a, other), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def adapted_qwen(qwen):
    base = _out(qwen, INP)
    # per-expert IA3 chained after LoRA on the expert weights: output scaling on gate/up, input on down
    ia3 = ga.IA3(targets=("expert_gate", "expert_up", "expert_down"), feedforward=("expert_down",))
    spec = ga.Spec({"l": ga.LoRA(r=4, alpha=8, targets="all-linear"), "i": ia3, "bn": SPEC["bn"]()})
    a = ga.apply(qwen, spec)
    return a, base


def test_shared_expert_model_lora_ia3_bottleneck_merge(adapted_qwen):
    a, base = adapted_qwen
    torch.testing.assert_close(_out(a, INP), base, atol=0, rtol=0)
    names = {n for n, _ in a.named_modules()}
    for site in ("layers.0.mlp.shared_expert.up_proj", "layers.0.mlp.shared_expert_gate", "layers.0.mlp.gate",
                 "layers.0.mlp.experts.gate_up_proj.expert_up", "layers.0.mlp.experts.down_proj",
                 "layers.0.self_attn.o_proj"):
        assert f"adapters.l.{site}" in names, site
    down = a.get_submodule("adapters.i.layers.0.mlp.experts.down_proj")
    gate = a.get_submodule("adapters.i.layers.0.mlp.experts.gate_up_proj.expert_gate")
    assert down.feedforward and down.ia3_l.shape == (4, 48)
    assert not gate.feedforward and gate.ia3_l.shape == (4, 48)
    perturb_adapters(a, seed=1, replace=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.startswith("adapters.i."):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    out = _out(a, INP)
    assert (out - base).abs().max() > 1e-2
    for m in (down, gate):      # each per-expert IA3 form acts
        m.active = False
        assert (_out(a, INP) - out).abs().max() > 1e-4
        m.active = True
    a.merge()
    assert not any(str(n.target).startswith(("adapters.l.", "adapters.i.")) for n in a.graph.nodes
                   if n.op == "call_module")
    torch.testing.assert_close(_out(a, INP), out, atol=1e-5, rtol=0)
    a.unmerge()
    torch.testing.assert_close(_out(a, INP), out, atol=0, rtol=0)


def test_composition_at_expert_sites_is_refused(adapted_qwen):
    """A composition block over adapters sharing expert sites: a clear SpecError, the model still works."""
    a, _ = adapted_qwen
    before = _out(a, INP)
    with pytest.raises(SpecError, match="expert sites"):
        a.set_active(ga.Stack("l", "i"))
    torch.testing.assert_close(_out(a, INP), before, atol=0, rtol=0)


def test_dora_and_pissa_on_experts_are_refused():
    from types import SimpleNamespace

    from graphadapt.methods.lora import LoRAMethod

    site = SimpleNamespace(num_experts=4, name="layers.0.mlp.experts.down_proj", in_features=8, out_features=6,
                           layout="linear", out_slice=None, total_out=6)
    w = torch.zeros(4, 6, 8)
    with pytest.raises(SpecError, match="expert weights"):
        LoRAMethod().build(ga.LoRA(r=2, targets=("expert_down",), use_dora=True), "d", site, 0, weight=w)
    with pytest.raises(SpecError, match="expert weights"):
        LoRAMethod().build(ga.LoRA(r=2, targets=("expert_down",), init="pissa"), "d", site, 0, weight=w)


# ----------------------------------------------------------------------------- PEFT parity
def test_peft_target_parameters_parity_and_import(tmp_path):
    peft = pytest.importorskip("peft")
    ref_model = tiny_mixtral()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pm = peft.get_peft_model(ref_model, cfg).eval()
    # the checkpoint layout read by the importer: per-expert LoRA flattened as PEFT's ParamWrapper stores it
    sd = {k: v for k, v in pm.state_dict().items() if "layers.0.mlp.experts" in k and "lora_A" in k}
    assert {tuple(v.shape) for v in sd.values()} == {(16, 32), (16, 64)}
    expected = _out(pm, INP)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"]

    a = ga.import_peft(tiny_mixtral(), tmp_path)
    names = {n for n, _ in a.named_modules()}
    assert "adapters.default.layers.1.mlp.experts.gate_up_proj" in names       # the whole fused weight, as PEFT
    got = _out(a, INP)
    assert (got - _out(tiny_mixtral(), INP)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # merged weights agree with PEFT's merge
    a.merge()
    merged = pm.merge_and_unload()
    torch.testing.assert_close(a.get_parameter("layers.1.mlp.experts.gate_up_proj"),
                               merged.layers[1].mlp.experts.gate_up_proj.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(a, INP), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the lowering
def test_grouped_mm_lowering_is_exact(adapted_mixtral):
    """The export copy (``converted_copy``) lowers grouped_mm and histc; the model itself keeps them."""
    from graphadapt.exporters.dtype import converted_copy
    from graphadapt.passes.experts import has_grouped_experts

    a, _, _ = adapted_mixtral
    inp = text_inputs(3, 5, seed=2)
    c = converted_copy(a, torch.float32, INP)
    assert c is not a and has_grouped_experts(a) and not has_grouped_experts(c)
    assert not any(n.target is torch.ops.aten.histc.default for n in c.graph.nodes)
    torch.testing.assert_close(_out(c, inp), _out(a, inp), atol=1e-6, rtol=0)



def test_peft_target_parameters_bad_checkpoint_is_refused(tmp_path):
    """A target_parameters checkpoint whose LoRA shapes fit no expert weight: a CheckpointError, before capture."""
    from safetensors.torch import save_file

    from graphadapt.errors import CheckpointError

    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [],
           "target_parameters": ["mlp.experts.down_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.layers.0.mlp.experts.lora_A.weight": torch.zeros(16, 7),
               "base_model.model.layers.0.mlp.experts.lora_B.weight": torch.zeros(32, 16)},
              str(tmp_path / "adapter_model.safetensors"))
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="which expert weight"):
        ga.import_peft(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
