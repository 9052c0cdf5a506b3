"""The compiled path (``adapted.compile()``, graphadapt/compiling.py): one graph, no breaks, dynamic
batch/sequence, training, and recompiles only when the graph changes (counted with ``CompileCounter``).

Backends are the cheap ones (``CompileCounter`` = eager, ``aot_eager`` for training): what is tested is the
graph handed to torch.compile and the dispatch around it, not inductor's kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from helpers import perturb_adapters, text_inputs, tiny_bert, tiny_llama  # noqa: E402


def _out(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state


@pytest.fixture()
def bert_lora():
    a = ga.apply(tiny_bert(num_hidden_layers=1), {"a": ga.LoRA(r=4, targets=("q", "v")),
                                                  "b": ga.LoRA(r=2, targets=("o",))})
    perturb_adapters(a)
    return a


def test_one_graph_dynamic_batch_and_sequence(bert_lora):
    shapes = [(3, 5), (2, 7), (4, 3), (5, 9)]
    refs = {s: _out(bert_lora, text_inputs(*s, seed=s[1])) for s in shapes}
    cc = CompileCounter()
    assert bert_lora.compile(backend=cc) is bert_lora
    for s in shapes:
        assert torch.equal(_out(bert_lora, text_inputs(*s, seed=s[1])), refs[s])
    # fullgraph=True (the default) would have raised on a graph break; one frame for every batch/sequence
    assert cc.frame_count == 1
    assert cc.op_count > 30
    assert ga.compiling.compiled_options(bert_lora)["fullgraph"] is True


def test_recompiles_only_when_the_graph_changes(bert_lora):
    x = text_inputs(3, 5)
    ref = _out(bert_lora, x)
    with bert_lora.disable_adapters():
        base = _out(bert_lora, x)
    assert not torch.allclose(ref, base)  # the adapters do something
    cc = CompileCounter()
    bert_lora.compile(backend=cc)
    _out(bert_lora, x)
    assert cc.frame_count == 1
    bert_lora.merge()  # a new graph: compiled once
    assert torch.allclose(_out(bert_lora, x), ref, atol=1e-5)
    _out(bert_lora, x)
    assert cc.frame_count == 2
    bert_lora.unmerge()  # back to the graph compiled first: its code is reused
    assert torch.equal(_out(bert_lora, x), ref)
    assert cc.frame_count == 2
    bert_lora.set_active("b")  # same graph, a guarded flag flips: one recompile per combination
    only_b = _out(bert_lora, x)
    assert cc.frame_count == 3
    bert_lora.set_active(None)
    assert torch.equal(_out(bert_lora, x), ref)
    bert_lora.set_active("b")
    assert torch.equal(_out(bert_lora, x), only_b)
    assert cc.frame_count == 3
    bert_lora.uncompile()
    assert torch.equal(_out(bert_lora, x), only_b)
    assert cc.frame_count == 3


def test_composition_change_compiles_the_new_graph():
    a = ga.apply(tiny_bert(num_hidden_layers=1), ga.Spec({"a": ga.SeqBn(reduction_factor=4),
                                                          "b": ga.SeqBn(reduction_factor=4)}, active=ga.Stack("a")))
    perturb_adapters(a)
    x = text_inputs(3, 5)
    only_a = _out(a, x)
    cc = CompileCounter()
    a.compile(backend=cc)
    assert torch.equal(_out(a, x), only_a)
    a.set_active(ga.Stack("a", "b"))  # re-planned: a new graph, compiled once
    stacked = _out(a, x)
    assert not torch.allclose(stacked, only_a)
    assert torch.equal(stacked, _out(a.uncompile(), x))
    assert cc.frame_count == 2


def test_training_matches_eager_gradients():
    a = ga.apply(tiny_llama(num_hidden_layers=1), ga.LoRA(r=4, targets=("q", "k", "v", "gate")))
    perturb_adapters(a)
    a.train()
    x = text_inputs(2, 6)

    def grads():
        a.zero_grad()
        a(**x).last_hidden_state.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in a.named_parameters() if p.requires_grad}

    ref = grads()
    assert ref and all(g.abs().sum() > 0 for g in ref.values())
    cc = CompileCounterWithBackend("aot_eager")
    a.compile(backend=cc)
    got = grads()
    assert cc.frame_count == 1
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)
    a.eval()  # eval flips the captured dropout nodes only when there are any: Llama has none
    assert cc.frame_count == 1


def test_copies_run_eagerly_and_bad_options_are_named(bert_lora):
    import copy

    bert_lora.compile(backend=CompileCounter())
    assert ga.compiling.compiled_options(copy.deepcopy(bert_lora)) is None
    with pytest.raises(ga.GraphAdaptError, match="unknown compile option"):
        bert_lora.compile(backend="eager", fullgrpah=True)
    with pytest.raises(ga.GraphAdaptError, match="graphadapt model"):
        ga.compile(torch.nn.Linear(2, 2))
