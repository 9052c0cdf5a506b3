"""Composition blocks as graph structure (main env): validation, training through nested blocks, linear-site
semantics, re-planning with set_active, fusion training mode, checkpoints, ONNX export. Parity with AdapterHub
is in tests/oracle/test_composition_oracle.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import graphadapt as ga

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import perturb_adapters, text_inputs, tiny_bert, tiny_llama  # noqa: E402

X = text_inputs(batch=4, seq=6, seed=3)


def _out(m, x=X):
    with torch.no_grad():
        return m(**x).last_hidden_state


@pytest.mark.parametrize("make,match", [
    (lambda: ga.Spec({"a": ga.SeqBn()}, active=ga.Stack("a", "nope")), "'nope', which is not an adapter"),
    (lambda: ga.Fuse("a"), "Fuse needs at least two children"),
    (lambda: ga.BatchSplit("a", "b", batch_sizes=[2]), "2 children but 1 batch_sizes"),
    (lambda: ga.BatchSplit("a", "b", batch_sizes=[2, 0]), "integers > 0"),
    (lambda: ga.Fuse("a", ga.Parallel("b", "c")), "Fuse cannot contain a Parallel"),
    (lambda: ga.Average("a", "b", weights=[1.0]), "2 finite numbers"),
    (lambda: ga.Fuse("a", "b", fusion="fancy"), "dynamic, static"),
    (lambda: ga.Fuse("a", "b", velue=True), "no option 'velue'"),
    (lambda: ga.Spec({"a": ga.SeqBn(), "b": ga.SeqBn(), "a_b": ga.LoRA()}, active=ga.Fuse("a", "b")),
     "collides with an adapter name"),
])
def test_invalid_compositions_are_spec_errors_before_capture(make, match):
    with pytest.raises(ga.SpecError, match=match):
        make()


def test_composition_round_trips_through_json_and_yaml():
    spec = ga.Spec({"u": ga.LoRA(), "a": ga.SeqBn(), "b": ga.SeqBn(), "c": ga.SeqBn()},
                   active=ga.Stack("u", ga.Fuse("a", ga.Stack("b", "c"), fusion="static", temperature=True)))
    assert ga.Spec.from_json(spec.to_json()) == spec == ga.Spec.from_yaml(spec.to_yaml())
    assert spec.active_names == ("u", "a", "b", "c") and spec.module_owners[-1] == "a_b_c"
    avg = ga.Spec({"a": ga.SeqBn(), "b": ga.SeqBn()}, active=ga.Average("a", "b", weights=[3, 1]))
    assert ga.Spec.from_json(avg.to_json()).active.weights == (0.75, 0.25)


def _seed_spec():
    return ga.Spec({"u": ga.LoRA(r=4, init="bert", targets=("q", "v")), "a": ga.SeqBn(reduction_factor=4),
                    "b": ga.SeqBn(reduction_factor=4)}, active=ga.Stack("u", ga.Fuse("a", "b")))


SCENARIOS = {
    # the seed scenario: a UniPELT union stacked under a fusion of two bottleneck adapters
    "unipelt+fuse": lambda: ga.Spec({"unipelt": ga.UniPELT(), "a": ga.SeqBn(), "b": ga.SeqBn()},
                                    active=ga.Stack("unipelt", ga.Fuse("a", "b"))),
    # Fuse over three methods: LoRA deltas fused at q/v, the bottleneck fused at the FFN residual,
    # the prefix (no fused quantity at an attention core) applied as it is
    "fuse(lora,prefix,seq)": lambda: ga.Spec({"lora": ga.LoRA(init="bert"), "prefix": ga.PrefixTuning(),
                                              "seq": ga.SeqBn()}, active=ga.Fuse("lora", "prefix", "seq")),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_composition_scenarios_train_and_export(make, scenario, tmp_path):
    base = make()
    spec = SCENARIOS[scenario]()
    adapted = ga.apply(base, spec)
    assert "(compose)" in str(adapted.plan)
    y0 = _out(adapted)
    assert (y0 - _out(base)).abs().max() > 1e-4
    target = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(list(adapted.trainable_parameters().values()), lr=1e-2)
    adapted.train()
    losses = []
    for step in range(5):
        opt.zero_grad()
        loss = (adapted(**X).last_hidden_state - target).pow(2).mean()
        loss.backward()
        if step == 0:  # every path gets a gradient: each adapter (union members included) and the fusion layers
            grads = {n.split(".")[1] for n, p in adapted.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert grads == set(spec.module_owners)
            assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("adapters."))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapted.eval()
    rep = ga.export_onnx(adapted, tmp_path / "m.onnx", verify=True)
    assert rep.verified and max(rep.max_abs_diff.values()) < 1e-4


def _two_loras(**kw):
    return ga.Spec({"l1": ga.LoRA(r=2, init="bert", targets=("q",)), "l2": ga.LoRA(r=2, init="bert", targets=("q",))},
                   **kw)


def test_linear_site_blocks_have_their_documented_meaning():
    base = tiny_bert()
    adapted = ga.apply(base, _two_loras(active=["l1"]))
    perturb_adapters(adapted, seed=5, std=0.3)
    only1 = _out(adapted)
    adapted.set_active(["l2"])
    only2 = _out(adapted)
    adapted.set_active(["l1", "l2"])
    chain = _out(adapted)
    assert (only1 - only2).abs().max() > 1e-4
    adapted.set_active(ga.Average("l1", "l2", weights=[1, 0]))
    torch.testing.assert_close(_out(adapted), only1, atol=1e-6, rtol=0)
    adapted.set_active(ga.Stack("l1", "l2"))
    torch.testing.assert_close(_out(adapted), chain, atol=1e-6, rtol=0)
    adapted.set_active(ga.BatchSplit("l1", "l2", batch_sizes=[1, 3]))
    split = _out(adapted)
    torch.testing.assert_close(split[:1], only1[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(split[1:], only2[1:], atol=1e-6, rtol=0)
    adapted.set_active(ga.Parallel("l1", "l2"))
    par = _out(adapted)
    assert par.shape[0] == 8
    torch.testing.assert_close(par[:4], only1, atol=1e-6, rtol=0)
    torch.testing.assert_close(par[4:], only2, atol=1e-6, rtol=0)
    adapted.set_active(ga.Fuse("l1", "l2"))
    fused = _out(adapted)
    assert (fused - only1).abs().max() > 1e-5 and (fused - only2).abs().max() > 1e-5
    with pytest.raises(ValueError, match=r"batch_sizes \[1, 3\].*batch has 2 rows"):
        adapted.set_active(ga.BatchSplit("l1", "l2", batch_sizes=[1, 3]))
        adapted(**text_inputs(batch=2, seq=6))


def test_set_active_replans_keeps_weights_and_a_refused_setup_changes_nothing():
    base = tiny_bert()
    adapted = ga.apply(base, _seed_spec())
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(0.05)
    before = _out(adapted)
    adapted.set_active(["u"])
    assert adapted.active == ("u",) and not adapted.fusion_layers()
    adapted.set_active(_seed_spec().active)
    torch.testing.assert_close(_out(adapted), before, atol=0, rtol=0)  # trained weights (and fusion) kept
    graph_code = adapted.code
    with pytest.raises(ga.SpecError, match="Stack/Parallel"):
        adapted.set_active(["a", "b"])  # two bottleneck adapters at one point, no block
    assert adapted.code == graph_code and adapted.spec.active == _seed_spec().active
    torch.testing.assert_close(_out(adapted), before, atol=0, rtol=0)
    adapted.merge()
    with pytest.raises(ga.GraphAdaptError, match="unmerge"):
        adapted.set_active(["u"])


def test_train_fusion_trains_only_the_fusion_layers():
    adapted = ga.apply(tiny_bert(), _seed_spec())
    adapted.train_fusion()
    trainable = {n.split(".")[1] for n in adapted.trainable_parameters()}
    assert trainable == {"a_b"}
    adapted.train_fusion(unfreeze_adapters=True)
    assert {n.split(".")[1] for n in adapted.trainable_parameters()} == {"u", "a", "b", "a_b"}
    reg = adapted.fusion_regularization()
    assert reg.item() >= 0 and reg.requires_grad


def test_composition_checkpoint_round_trip(tmp_path):
    adapted = ga.apply(tiny_bert(), _seed_spec())
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters.a_b."):
                p.add_(0.1)
    want = _out(adapted)
    adapted.save_adapters(tmp_path / "ckpt")
    again = ga.load(tiny_bert(), tmp_path / "ckpt")
    assert again.spec.active == _seed_spec().active
    torch.testing.assert_close(_out(again.eval()), want, atol=0, rtol=0)


def test_fuse_children_absent_at_a_position_are_pruned():
    """Houlsby adapter u has mh and output sites, a and b only output: at mh the block is just u."""
    spec = ga.Spec({"u": ga.DoubleSeqBn(reduction_factor=4), "a": ga.SeqBn(reduction_factor=4),
                    "b": ga.SeqBn(reduction_factor=4)}, active=ga.Stack("u", ga.Fuse("a", "b")))
    adapted = ga.apply(tiny_bert(), spec)
    kinds = {c.site.rsplit(".", 1)[-1]: c.mode for c in adapted.plan.combinations}
    assert kinds == {"output_adapter": "compose"}
    assert torch.isfinite(_out(adapted)).all()


def test_a_replan_failing_after_the_composition_pass_restores_the_old_composition(monkeypatch):
    """The composition pass replaces ``adapters._compose.<site>`` in place; a failure later in the re-plan must
    put the old composition modules back, or the restored graph would call the new ones."""
    plan_mod = sys.modules["graphadapt.plan"]  # the module (ga.plan is the function of the same name)

    spec = ga.Spec({"a": ga.SeqBn(reduction_factor=4), "b": ga.SeqBn(reduction_factor=4)}, active=ga.Fuse("a", "b"))
    adapted = ga.apply(tiny_bert(), spec)
    before = _out(adapted)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(plan_mod, "replicate_inputs", boom)
    with pytest.raises(ga.PassError, match="injected failure"):
        adapted.set_active(ga.Parallel("a", "b"))
    assert adapted.spec.active == spec.active
    torch.testing.assert_close(_out(adapted), before, atol=0, rtol=0)
