"""Decode steps of ``generate``: the lean decode copy of the cached graph (exact), the static KV cache
(``cache_implementation="static"``: preallocated buffers written in place by a fixed-shape step graph) and its
compiled form (one compile for the prefill family, one for the step; again only when the graph changes).

Compile tests use ``CompileCounter`` (the eager backend): what is tested is the graph handed to torch.compile and
how often, not inductor's kernels.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt import generation  # noqa: E402
from graphadapt.kvcache import bind_graph, decode_graph  # noqa: E402
from helpers import randomize_lora, tiny_gpt2, tiny_llama, tiny_t5  # noqa: E402

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def prompts(batch=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : min(2 * i, seq - 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module", params=list(BUILDERS))
def lm(request):
    model = BUILDERS[request.param](causal_lm=True)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")), cache=True)
    randomize_lora(adapted, seed=1, std=0.3)
    return request.param, model, adapted


def _reference_steps(monkeypatch):
    """Decode steps through the model's own ``forward`` (what ran before the decode copy existed)."""
    monkeypatch.setattr(generation, "_dynamic_step",
                        lambda cached: lambda **i: cached.forward(**i, **cached.constant_inputs))


def test_decode_copy_is_lean_and_exact(lm, monkeypatch):
    name, model, adapted = lm
    graph, names = decode_graph(adapted, adapted.decoder_cache["num_layers"])
    assert names[0] == "logits" and "present.1.value" in names
    targets = [str(n.target) for n in graph.nodes]
    assert "_guards_fn" not in targets and not any("lift_fresh_copy" in t for t in targets)
    assert len(graph.nodes) < len(adapted.graph.nodes)
    fast = bind_graph(adapted, graph, fast=True)
    assert "aten" not in fast.__code__.co_names and any(n.startswith("_fast_aten_") for n in fast.__code__.co_names)
    ids, mask = prompts()
    for merged in (False, True):
        if merged:
            adapted.merge()
        try:
            out, scores = adapted.generate(ids, mask, max_new_tokens=6, output_scores=True, eos_token_id=[])
            with monkeypatch.context() as m:
                _reference_steps(m)
                ref, ref_scores = adapted.generate(ids, mask, max_new_tokens=6, output_scores=True, eos_token_id=[])
        finally:
            if merged:
                adapted.unmerge()
        assert torch.equal(out, ref)
        assert torch.equal(scores, ref_scores)  # the same kernels on the same tensors: bit-identical logits
    # a deep copy builds its own decode functions (the original's would read the original's weights)
    step = generation._dynamic_step(adapted)
    assert generation._dynamic_step(copy.deepcopy(adapted)) is not step
    assert generation._dynamic_step(adapted) is step
    assert pickle.loads(pickle.dumps(generation._scratch(adapted))) == {}


@pytest.mark.parametrize("merged", [False, True])
def test_static_cache_gives_the_dynamic_tokens(lm, merged):
    name, model, adapted = lm
    ids, mask = prompts()
    if merged:
        adapted.merge()
    try:
        dyn, dyn_scores = adapted.generate(ids, mask, max_new_tokens=8, output_scores=True, eos_token_id=[])
        st, st_scores = adapted.generate(ids, mask, max_new_tokens=8, output_scores=True, eos_token_id=[],
                                         cache_implementation="static")
        runner = generation._decoding_graph(adapted)  # unmerged: the inference copy decodes
        held = generation._scratch(runner)["static_cache"]
        # a shorter call reuses the buffers (zeroed) and still decodes the same tokens
        again = adapted.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=4, eos_token_id=[],
                                 cache_implementation="static")
        assert generation._scratch(runner)["static_cache"] is held
        short = adapted.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=4, eos_token_id=[])
    finally:
        if merged:
            adapted.unmerge()
    assert torch.equal(st, dyn) and torch.equal(again, short)
    # the static step attends over all L slots (empty ones masked): equal up to summation order
    torch.testing.assert_close(st_scores, dyn_scores, atol=1e-5, rtol=1e-5)
    # and the adapter is in it: the base model's logits differ
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert (torch.stack(base.scores) - st_scores).abs().max() > 1e-2


def test_static_cache_refuses_what_it_cannot_do(lm):
    name, model, adapted = lm
    ids, mask = prompts()
    with pytest.raises(ga.GraphAdaptError, match="cache_implementation must be"):
        adapted.generate(ids, mask, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(ga.GraphAdaptError, match="num_beams=1"):
        adapted.generate(ids, mask, max_new_tokens=2, num_beams=2, cache_implementation="static")


def test_static_cache_refuses_encoder_decoder():
    t5 = ga.apply(tiny_t5(), ga.LoRA(r=2, targets=("q", "v")))
    ids = torch.randint(3, 99, (2, 5))
    with pytest.raises(ga.GraphAdaptError, match="decoder-only"):
        t5.generate(ids, max_new_tokens=2, cache_implementation="static")


def test_compiled_static_decoding_compiles_once_per_graph():
    model = tiny_llama(causal_lm=True)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")), cache=True)
    randomize_lora(adapted, seed=2, std=0.3)
    ids, mask = prompts()
    want = adapted.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    want_short = adapted.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=5, eos_token_id=[])
    adapted.merge()
    want_merged = adapted.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    adapted.unmerge()

    cc = CompileCounter()
    adapted.compile(backend=cc)
    got = adapted.generate(ids, mask, max_new_tokens=10, eos_token_id=[], cache_implementation="static")
    assert torch.equal(got, want)
    assert cc.frame_count == 2  # the prefill (dynamic batch/sequence) and the static step, for all 9 steps
    # another prompt length and fewer tokens: the prefill graph is dynamic, the step reuses the cache buffers
    got = adapted.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=5, eos_token_id=[], cache_implementation="static")
    assert torch.equal(got, want_short)
    assert cc.frame_count == 2
    adapted.merge()  # a new graph: its prefill and its step compile once
    got = adapted.generate(ids, mask, max_new_tokens=10, eos_token_id=[], cache_implementation="static")
    assert torch.equal(got, want_merged)
    assert cc.frame_count == 4
    adapted.unmerge()  # back to a graph compiled before: nothing new
    got = adapted.generate(ids, mask, max_new_tokens=10, eos_token_id=[], cache_implementation="static")
    assert torch.equal(got, want)
    assert cc.frame_count == 4
