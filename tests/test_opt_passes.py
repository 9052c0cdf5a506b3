"""Inference passes (graphadapt/passes/inference.py) through ``graphadapt.optimize_for_inference``: each pass is
exact, does what it says (node counts, GEMM counts) and is checked against the eager adapted model; the merged
graph keeps the base graph's node count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.passes import adapter_call_nodes  # noqa: E402
from graphadapt.passes.inference import LOWERED_PREFIX  # noqa: E402
from helpers import perturb_adapters, text_inputs, tiny_bert, tiny_llama  # noqa: E402

aten = torch.ops.aten
X = text_inputs(3, 5)


def _out(model):
    with torch.no_grad():
        return model(**X).last_hidden_state


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.fixture(scope="module")
def llama():
    # alpha = 2r: s = 2, a power of two, so folding s into B changes no bit
    a = ga.apply(tiny_llama(), ga.LoRA(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")))
    perturb_adapters(a)
    return a


def test_dropout_nodes_gone_in_eval():
    a = ga.apply(tiny_bert(), ga.LoRA(r=4, targets=("q", "v")))
    perturb_adapters(a)
    assert _count(a, aten.dropout.default) > 0
    inf = ga.optimize_for_inference(a, low_rank=False)
    assert _count(inf, aten.dropout.default) == 0
    assert inf.info["remove_eval_dropout"]["removed"] == _count(a, aten.dropout.default)
    assert torch.equal(_out(inf), _out(a))
    with pytest.raises(ga.GraphAdaptError, match="inference copy"):
        inf.train()
    with pytest.raises(ga.GraphAdaptError, match="eval mode"):
        ga.optimize_for_inference(a.train())
    a.eval()


def test_scaling_folded_into_B_is_bitwise(llama):
    inf = ga.optimize_for_inference(llama, concat=False)
    sites = len(llama.adapter_records)
    assert inf.info["lower_low_rank"] == {"lowered": sites, "identity": 0, "gemms": sites, "up_gemms": sites}
    assert not adapter_call_nodes(inf)  # every LoRA call became explicit GEMMs
    mod = llama.get_submodule(llama.adapter_records[0].target)
    assert torch.equal(inf._lowered_0_B0, mod.low_rank_delta().B * 2)
    assert torch.equal(_out(inf), _out(llama))
    with llama.disable_adapters():
        assert not torch.allclose(_out(inf), _out(llama))


def test_one_gemm_for_down_projections_sharing_an_input(llama):
    inf = ga.optimize_for_inference(llama)
    layers = llama.config.num_hidden_layers
    # per layer: q/k/v share the normed stream, gate/up share the other one, o and down stand alone
    assert inf.info["lower_low_rank"]["gemms"] == 4 * layers
    assert inf.info["lower_low_rank"]["up_gemms"] == 4 * layers
    widths = sorted(b.shape[0] for n, b in inf.named_buffers() if n.startswith(LOWERED_PREFIX) and n.endswith("_A"))
    assert widths == sorted([12, 4, 8, 4] * layers)
    hidden, kv = llama.config.hidden_size, llama.config.hidden_size // 2  # 2 of 4 heads are kv heads
    assert inf._lowered_0_B.shape == (hidden + 2 * kv, 12)  # block-diagonal s·B of q, k, v
    assert not inf._lowered_0_B[:hidden, 4:].any()
    ref = _out(llama)
    assert (_out(inf) - ref).abs().max() <= 1e-6 * ref.abs().max()
    separate = ga.optimize_for_inference(llama, concat_up=False)
    assert separate.info["lower_low_rank"]["up_gemms"] == len(llama.adapter_records)
    assert (_out(separate) - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_non_power_of_two_scale_and_inactive_adapters():
    a = ga.apply(tiny_bert(), {"a": ga.LoRA(r=4, alpha=6, targets=("q", "v")), "b": ga.LoRA(r=2, targets=("q",))})
    perturb_adapters(a)
    ref = _out(a)
    inf = ga.optimize_for_inference(a)
    assert inf.info["lower_low_rank"]["lowered"] == len(a.adapter_records)
    assert (_out(inf) - ref).abs().max() <= 1e-6 * ref.abs().max()
    a.set_active("b")
    inf_b = ga.optimize_for_inference(a)
    assert inf_b.info["lower_low_rank"]["identity"] == 2 * a.config.num_hidden_layers
    assert torch.equal(_out(inf_b), _out(a))
    a.set_active(None)


def test_modules_without_a_low_rank_form_stay_calls():
    a = ga.apply(tiny_bert(), {"d": ga.LoRA(r=4, targets=("q",), use_dora=True), "s": ga.SeqBn(reduction_factor=4)})
    perturb_adapters(a)
    inf = ga.optimize_for_inference(a)
    assert inf.info["lower_low_rank"]["lowered"] == 0
    assert len(adapter_call_nodes(inf)) == len(adapter_call_nodes(a))
    assert torch.equal(_out(inf), _out(a))


def test_inference_copy_compiles_as_one_graph(llama):
    inf = ga.optimize_for_inference(llama)
    cc = CompileCounter()
    inf.compile(backend=cc)
    ref = _out(llama)
    assert (_out(inf) - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert cc.frame_count == 1


@pytest.mark.parametrize("spec", [ga.LoRA(r=4, targets=("q", "k", "v", "o", "up", "down")),
                                  ga.IA3(targets=("k", "v", "down"))], ids=["lora", "ia3"])
def test_merged_graph_has_the_base_node_count(spec):
    a = ga.apply(tiny_bert(), spec)
    perturb_adapters(a)
    base_nodes = len(a._planning.base_graph.nodes)
    assert len(a.graph.nodes) > base_nodes
    unmerged = _out(a)
    a.merge(strict=True)
    assert len(a.graph.nodes) == base_nodes
    torch.testing.assert_close(_out(a), unmerged, atol=1e-5, rtol=1e-5)


def test_unmerged_decoding_runs_the_inference_copy_and_follows_edits():
    a = ga.apply(tiny_llama(causal_lm=True, num_hidden_layers=1), ga.LoRA(r=4, targets=("q", "k", "v")), cache=True)
    perturb_adapters(a)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def hf_tokens():
        return a.to_base_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                          do_sample=False, pad_token_id=0)

    out = a.generate(ids, max_new_tokens=6)
    key, fast = a.__dict__["_decoding_copy"]
    assert fast is not a and fast.info["lower_low_rank"]["lowered"] == 3
    assert torch.equal(out, hf_tokens())
    a.generate(ids, max_new_tokens=6)
    assert a.__dict__["_decoding_copy"][1] is fast  # reused while nothing changed
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.startswith("adapters."):
                p.mul_(-3)
    out2 = a.generate(ids, max_new_tokens=6)  # an in-place edit rebuilds the copy
    assert a.__dict__["_decoding_copy"][1] is not fast
    assert torch.equal(out2, hf_tokens())
