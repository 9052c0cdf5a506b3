"""Composition blocks against AdapterHub ``adapters`` 1.3.0 (oracle venv): Fuse (dynamic, static), Stack with a
nested Fuse, BatchSplit, Parallel and Average (AdapterHub's mean reproduced with ``adapterhub_mean=True``).

Each case: AdapterHub bottleneck adapters with every tensor non-zero random and fusion layers randomised away from
their near-identity init, saved with ``save_adapter`` / ``save_adapter_fusion``; graphadapt imports them
(``import_adapterhub_fusion`` / the adapter readers), activates the same block, and must match within 1e-5 while
differing from the base model and from each adapter alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapters
from adapters import DoubleSeqBnConfig, SeqBnConfig
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Stack

import graphadapt as ga
from graphadapt.checkpoints.adapterhub import read_adapterhub_adapter, read_adapterhub_fusion
from graphadapt.methods import get_method
from adapterhub_helpers import randomize_adapterhub
from helpers import text_inputs, tiny_bert

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


@torch.no_grad()
def _randomize_fusion(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if "adapter_fusion_layer" in pname:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
            n += 1
    assert n > 0


def _ah_model(cfgs: dict, fusions=(), fusion_cfg="dynamic"):
    base = tiny_bert()
    m = copy.deepcopy(base)
    adapters.init(m)
    for i, (name, cfg) in enumerate(cfgs.items()):
        m.add_adapter(name, config=cfg)
        assert randomize_adapterhub(m, name, seed=10 + i) > 0
    for f in fusions:
        m.add_adapter_fusion(f, fusion_cfg)
    if fusions:
        _randomize_fusion(m)
    m.eval()
    return base, m


def _import(base, ah, names, tmp_path, active, fusions=()):
    """graphadapt model with AdapterHub's adapters (and fusion layers) loaded; ``active(fuse blocks)`` is
    the composition to apply with."""
    reads = {}
    for n in names:
        ah.save_adapter(str(tmp_path / n), n)
        reads[n] = read_adapterhub_adapter(tmp_path / n)
    blocks = []
    for f in fusions:
        d = tmp_path / ("fusion_" + "_".join(f.children))
        ah.save_adapter_fusion(str(d), ",".join(f.children))
        blocks.append(read_adapterhub_fusion(d))
    spec = ga.Spec({n: r[0] for n, r in reads.items()}, active=active([b for b, _ in blocks]))
    adapted = ga.apply(base, spec)
    for n, (_, saved, fill) in reads.items():
        fill(adapted, n)
    for _, fill_fusion in blocks:
        fill_fusion(adapted, get_method("bottleneck"))
    return adapted


def _compare(ah, adapted, base, x, **extra):
    with torch.no_grad():
        want = ah(**x).last_hidden_state
        got = adapted.eval()(**x).last_hidden_state
        plain = base(**x).last_hidden_state
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got[: plain.shape[0]] - plain).abs().max() > 1e-3
    return got


X = text_inputs(batch=4, seq=6, seed=7, pad=2)


@pytest.mark.parametrize("fusion_cfg", ["dynamic", "static"])
@pytest.mark.parametrize("cfg", [SeqBnConfig(reduction_factor=4), DoubleSeqBnConfig(reduction_factor=4)],
                         ids=["seq_bn", "double_seq_bn"])
def test_fuse_matches_adapterhub_through_the_fusion_importer(tmp_path, cfg, fusion_cfg):
    base, ah = _ah_model({"a": cfg, "b": copy.deepcopy(cfg)}, fusions=[Fuse("a", "b")], fusion_cfg=fusion_cfg)
    ah.set_active_adapters(Fuse("a", "b"))
    ah.save_adapter(str(tmp_path / "a"), "a")
    ah.save_adapter(str(tmp_path / "b"), "b")
    ah.save_adapter_fusion(str(tmp_path / "fusion"), "a,b")
    adapted = ga.import_adapterhub_fusion(base, tmp_path / "fusion", [tmp_path / "a", tmp_path / "b"])
    assert isinstance(adapted.spec.active, ga.Fuse) and adapted.spec.active.fusion == "dynamic"
    assert dict(adapted.spec.active.options)["value"] == (fusion_cfg == "dynamic")
    got = _compare(ah, adapted, base, X)
    adapted.set_active("a")  # fusion really mixes: differs from either adapter alone
    with torch.no_grad():
        assert (adapted(**X).last_hidden_state - got).abs().max() > 1e-4
    adapted.set_active(ga.Fuse("a", "b", fusion=fusion_cfg))  # back: the fusion layers were kept
    with torch.no_grad():
        torch.testing.assert_close(adapted(**X).last_hidden_state, got, atol=0, rtol=0)
    reg = adapted.fusion_regularization()
    assert (reg.item() > 0) == (fusion_cfg == "dynamic")  # dynamic: 0.01·‖I − V‖², V was randomised


def test_stack_with_nested_fuse_matches_adapterhub(tmp_path):
    cfg = SeqBnConfig(reduction_factor=4)
    # u only after the FFN, like a and b: AdapterHub 1.3 raises KeyError when a Fuse's children are absent at a
    # layer position (graphadapt prunes them; test_composition.py covers that case)
    base, ah = _ah_model({"u": SeqBnConfig(reduction_factor=2, non_linearity="gelu"), "a": cfg, "b": copy.deepcopy(cfg)},
                         fusions=[Fuse("a", "b")])
    ah.set_active_adapters(Stack("u", Fuse("a", "b")))
    adapted = _import(base, ah, ["u", "a", "b"], tmp_path, lambda fuses: ga.Stack("u", fuses[0]),
                      fusions=[Fuse("a", "b")])
    _compare(ah, adapted, base, X)


def test_batch_split_matches_adapterhub(tmp_path):
    cfg = SeqBnConfig(reduction_factor=4)
    base, ah = _ah_model({"a": cfg, "b": copy.deepcopy(cfg)})
    ah.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 3]))
    adapted = _import(base, ah, ["a", "b"], tmp_path, lambda _: ga.BatchSplit("a", "b", batch_sizes=[1, 3]))
    _compare(ah, adapted, base, X)
    with pytest.raises(ValueError, match=r"batch_sizes \[1, 3\] sum to 4, but the batch has 3 rows"):
        adapted(**text_inputs(batch=3, seq=6, seed=1))


def test_parallel_matches_adapterhub(tmp_path):
    cfg = DoubleSeqBnConfig(reduction_factor=4)
    base, ah = _ah_model({"a": cfg, "b": copy.deepcopy(cfg)})
    ah.set_active_adapters(Parallel("a", "b"))
    adapted = _import(base, ah, ["a", "b"], tmp_path, lambda _: ga.Parallel("a", "b"))
    got = _compare(ah, adapted, base, X)
    assert got.shape[0] == 2 * X["input_ids"].shape[0]


def test_average_matches_adapterhub_mean_and_true_average_differs(tmp_path):
    cfg = SeqBnConfig(reduction_factor=4)
    base, ah = _ah_model({"a": cfg, "b": copy.deepcopy(cfg)})
    ah.set_active_adapters(Average("a", "b", weights=[0.7, 0.3]))
    adapted = _import(base, ah, ["a", "b"], tmp_path,
                      lambda _: ga.Average("a", "b", weights=[0.7, 0.3], adapterhub_mean=True))
    got = _compare(ah, adapted, base, X)
    adapted.set_active(ga.Average("a", "b", weights=[0.7, 0.3]))  # graphadapt's default: a true weighted average
    with torch.no_grad():
        true_avg = adapted(**X).last_hidden_state
    assert (true_avg - got).abs().max() > 1e-3
