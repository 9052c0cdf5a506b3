"""Adapted models round-trip PyTorch ↔ onnxruntime: merged and unmerged, fp32 and fp16,
on shapes not used at capture; a merged LoRA export has the base export's node count."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.exporters import export_onnx

from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "vit": tiny_vit}


def _adapted(name):
    spec = ga.Spec({"lora": ga.LoRA(r=4, alpha=8, targets=("q", "v", "down")),
                    "bn": ga.SeqBn(reduction_factor=4, init_weights="mam_adapter")})
    adapted = ga.apply(BUILDERS[name](), spec)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # trained-looking adapters: every zero-initialised tensor gets values
        for n, p in adapted.named_parameters():
            if n.endswith(("lora_B", "adapter_up.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted


@pytest.fixture(scope="module")
def adapted_models():
    return {}


# every architecture both merged and unmerged and in both dtypes, without the full cross product
# (each export costs seconds): fp32 unmerged (the adapter graph exactly) and fp16 merged
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("dtype,merge", [("fp32", False), ("fp16", True)], ids=["fp32-unmerged", "fp16-merged"])
def test_roundtrip(name, merge, dtype, tmp_path, adapted_models):
    if name not in adapted_models:
        adapted_models[name] = _adapted(name)
    adapted = adapted_models[name]
    rep = export_onnx(adapted, tmp_path / "m.onnx", dtype=dtype, merge=merge, verify=True)
    assert rep.verified and rep.merged == merge
    ex = adapted.example_inputs()
    for k, shape in rep.verify_input_shapes.items():
        # token_type_ids: added by the exporter (BERT's tokenizer returns them), shaped as input_ids
        assert tuple(shape) != tuple(ex.get(k, ex.get("input_ids")).shape), "verification must use new shapes"
    worst = max(rep.max_abs_diff.values())
    assert worst <= rep.atol + rep.rtol * 10, worst  # export_onnx raised already if not; belt and braces
    assert not adapted.is_merged  # the exporter restores the caller's state
    ops = rep.op_histogram
    # the bottleneck adapter always stays; LoRA leaves MatMuls only when unmerged
    assert sum(ops.values()) == rep.node_count


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # Conv1D and Linear; BERT's linears are Llama's kind
def test_merged_lora_has_base_node_count(name, tmp_path):
    model = BUILDERS[name]()
    base = export_onnx(ga.capture(model), tmp_path / "base.onnx", verify=False)
    adapted = ga.apply(model, ga.LoRA(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    merged = export_onnx(adapted, tmp_path / "merged.onnx", merge=True, verify=True)
    unmerged = export_onnx(adapted, tmp_path / "unmerged.onnx", merge=False, verify=False)
    assert merged.node_count == base.node_count
    assert merged.op_histogram == base.op_histogram
    assert unmerged.node_count > base.node_count  # the LoRA branches really were there
