"""Hot-swap in PyTorch: ``prepare_hot_swap`` + ``hot_swap`` replace an adapter's weights in place.

References are built independently of the swap: alternative linear-site adapters live in the same model (a
dormant one is the identity at its site) and are run with ``set_active``; the alternative bottleneck lives in
a model of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import GraphAdaptError
from tests.helpers import perturb_adapters, text_inputs, tiny_bert, tiny_llama

SLOTS = ["lora", "dora", "ia3", "bn", "gated"]


def _out(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state.detach().clone()


@pytest.fixture(scope="module")
def setup():
    spec = ga.Spec({
        "lora": ga.LoRA(r=4, alpha=8, targets=["q", "v"]),
        "dora": ga.LoRA(r=2, alpha=4, targets=["o"], use_dora=True),
        "ia3": ga.IA3(targets=["k", "down"], feedforward=["down"]),
        "bn": ga.SeqBn(reduction_factor=8),
        "b1": ga.LoRA(r=2, alpha=3, targets=["q", "v"]),
        "b2": ga.LoRA(r=8, alpha=5, targets=["q", "v"], use_rslora=True),
        "dora_b": ga.LoRA(r=4, alpha=3, targets=["o"], use_dora=True),
        "ia3_b": ga.IA3(targets=["k", "down"], feedforward=["down"]),
        "too_big": ga.LoRA(r=16, targets=["q", "v"]),
        "elsewhere": ga.LoRA(r=2, targets=["q"]),
        "gated": ga.LoRA(r=2, targets=["up"], use_gating=True),     # the gate replaces alpha/r: B is not scaled
        "gated_b": ga.LoRA(r=4, alpha=7, targets=["up"], use_gating=True),
    }, active=SLOTS)
    model = ga.apply(tiny_bert(), spec)
    perturb_adapters(model, seed=1, std=0.2)
    model.eval()
    bn_src = ga.apply(tiny_bert(), ga.Spec({"bn_b": ga.SeqBn(reduction_factor=16, scaling=0.5)}))
    perturb_adapters(bn_src, seed=2, std=0.2)
    bn_src.eval()
    x = text_inputs()
    refs = {}
    for slot, alt in (("lora", "b1"), ("lora", "b2"), ("dora", "dora_b"), ("ia3", "ia3_b"), ("gated", "gated_b")):
        model.set_active([alt if s == slot else s for s in SLOTS])
        refs[alt] = _out(model, x)
    model.set_active(SLOTS)
    refs["default"] = _out(model, x)
    return model, bn_src, x, refs


def test_hot_swap_matches_independently_built_adapters(setup):
    model, bn_src, x, refs = setup
    m = copy.deepcopy(model)
    assert m.prepare_hot_swap(max_rank=8, names=SLOTS) == {"lora": 8, "dora": 8, "ia3": None, "bn": 8, "gated": 8}
    assert (_out(m, x) - refs["default"]).abs().max() < 1e-5  # slot form (padded, scale folded): same model
    for alt, slot in (("b1", "lora"), ("b2", "lora"), ("dora_b", "dora"), ("ia3_b", "ia3"), ("gated_b", "gated")):
        m.hot_swap(slot, model, adapter=alt)
        assert (_out(m, x) - refs[alt]).abs().max() < 1e-5, alt
        m.hot_swap(slot, model, adapter=slot)  # and back
        assert (_out(m, x) - refs["default"]).abs().max() < 1e-5, alt
    # a bottleneck of another width and scaling, from a model of its own: the slot now computes what that
    # model's bottleneck computes (compared with the same model built with it alone)
    solo = ga.apply(tiny_bert(), ga.Spec({"bn": ga.SeqBn(reduction_factor=8)}))
    solo.eval()
    solo.prepare_hot_swap(max_rank=8)
    solo.hot_swap("bn", bn_src)
    assert (_out(solo, x) - _out(bn_src, x)).abs().max() < 1e-5
    assert (_out(solo, x) - refs["default"]).abs().max() > 1e-3  # the swap did something


def test_swap_into_compiled_model_does_not_recompile(setup):
    from torch._dynamo.testing import CompileCounter

    model, _, x, refs = setup
    m = copy.deepcopy(model)
    m.prepare_hot_swap(max_rank=8, names=["lora"])
    torch._dynamo.reset()
    counter = CompileCounter()
    try:
        compiled = torch.compile(m, backend=counter)
        first = _out(compiled, x)
        assert (first - refs["default"]).abs().max() < 1e-5
        frames = counter.frame_count
        assert frames > 0
        for i in range(20):
            alt = ("b1", "b2")[i % 2]
            m.hot_swap("lora", model, adapter=alt)
            out = _out(compiled, x)
            assert (out - refs[alt]).abs().max() < 1e-5, (i, alt)  # fails if the swap did nothing
        assert counter.frame_count == frames  # 20 swaps, 0 recompiles
    finally:
        torch._dynamo.reset()


def test_refused_swaps_leave_the_model_untouched(setup, tmp_path):
    model, bn_src, x, refs = setup
    m = copy.deepcopy(model)
    with pytest.raises(GraphAdaptError, match="prepare_hot_swap"):  # alpha/r is not folded yet
        m.hot_swap("lora", model, adapter="b1")
    m.prepare_hot_swap(max_rank=8, names=SLOTS)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("adapters.")}
    cases = [
        (("lora", model, "too_big"), "rank 16"),
        (("lora", model, "elsewhere"), "sites"),
        (("dora", model, "ia3_b"), "sites|more than rank"),
        (("lora", model, None), "name the one"),
        (("bn", {"nope": torch.zeros(1)}, None), "no tensor"),
        (("nope", model, "b1"), "unknown adapter"),
    ]
    for args, match in cases:
        with pytest.raises(GraphAdaptError, match=match):
            m.hot_swap(*args)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (_out(m, x) - refs["default"]).abs().max() < 1e-5
    with pytest.raises(GraphAdaptError, match="more than max_rank"):
        copy.deepcopy(model).prepare_hot_swap(max_rank=2, names=["lora"])
    # a slot no longer matches its spec (padded, scaling folded): saving it under that spec is refused
    with pytest.raises(GraphAdaptError, match="hot-swap slots"):
        m.save_adapters(tmp_path / "slots")
    with pytest.raises(GraphAdaptError, match="hot-swap slots"):
        copy.deepcopy(m).to_peft(tmp_path / "peft", "lora")
    m.save_adapters(tmp_path / "b1", names=["b1"])  # adapters that are not slots still save


def test_hot_swap_from_checkpoint_directory(setup, tmp_path):
    """A saved graphadapt checkpoint (re-applied to the model's source) into the slot."""
    model, _, x, refs = setup
    model.save_adapters(tmp_path / "b2", names=["b2"])
    m = copy.deepcopy(model)
    m.prepare_hot_swap(max_rank=8, names=["lora"])
    m.hot_swap("lora", tmp_path / "b2")
    assert (_out(m, x) - refs["b2"]).abs().max() < 1e-5


def test_llama_hot_swap_lora_and_bottleneck():
    spec = ga.Spec({"lora": ga.LoRA(r=2, alpha=4, targets=["q", "v"]), "b": ga.LoRA(r=4, alpha=2, targets=["q", "v"]),
                    "bn": ga.SeqBn(reduction_factor=16)}, active=["lora", "bn"])
    model = ga.apply(tiny_llama(num_hidden_layers=1), spec)
    perturb_adapters(model, seed=4, std=0.2)
    model.eval()
    x = text_inputs()
    model.set_active(["b", "bn"])
    want = _out(model, x)
    model.set_active(["lora", "bn"])
    m = copy.deepcopy(model)
    m.prepare_hot_swap(max_rank=4)
    m.hot_swap("lora", model, adapter="b")
    assert (_out(m, x) - want).abs().max() < 1e-5
    assert (_out(m, x) - _out(model, x)).abs().max() > 1e-3


def test_hot_swap_one_tenant_of_a_routed_model():
    """A routed model replaces one tenant's adapter in place: that tenant's rows follow the new adapter,
    the other tenant's rows and the base rows are unchanged."""
    spec = ga.Spec({"a": ga.LoRA(r=4, alpha=8, targets=["q", "v"]), "b": ga.LoRA(r=2, targets=["q", "v"]),
                    "c": ga.LoRA(r=8, alpha=5, targets=["q", "v"])}, active=ga.Route("a", "b"))
    model = ga.apply(tiny_bert(), spec)
    perturb_adapters(model, seed=3, std=0.2)
    model.eval()
    x = text_inputs(3, 6)
    ids = torch.tensor([0, 1, -1])

    def rows(active):
        model.set_active(active)
        out = _out(model, x)
        model.set_active(ga.Route("a", "b"))
        return out

    want_c, want_b, base = rows("c"), rows("b"), rows([])
    before = model(**x, adapter_ids=ids).last_hidden_state.detach()
    assert not torch.allclose(before[0], want_c[0], atol=1e-3)  # tenant 0 runs "a" before the swap
    model.prepare_hot_swap(max_rank=8, names=["a"])
    model.hot_swap("a", model, adapter="c")
    with torch.no_grad():
        after = model(**x, adapter_ids=ids).last_hidden_state
    torch.testing.assert_close(after[0], want_c[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after[1], want_b[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(after[2], base[2], atol=1e-5, rtol=0)
