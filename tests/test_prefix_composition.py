"""Prefix-tuning adapters composed at attention cores (AdapterHub parity: tests/oracle/test_adapterhub_blocks_oracle.py),
and re-planning keeping trained prefix weights."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import SpecError
from helpers import text_inputs, tiny_gpt2

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_prefixes():
    spec = ga.Spec({"a": ga.PrefixTuning(prefix_length=2, flat=True), "b": ga.PrefixTuning(prefix_length=4, flat=True)},
                   active="a")
    m = ga.apply(tiny_gpt2(seed=0), spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def test_set_active_keeps_trained_prefixes(two_prefixes):
    x = text_inputs(3, 5, pad=1)
    first = _out(two_prefixes, x)
    two_prefixes.set_active("b")     # re-plans: the prefix modules are reused, not re-initialised
    other = _out(two_prefixes, x)
    two_prefixes.set_active("a")
    torch.testing.assert_close(_out(two_prefixes, x), first)
    assert (other - first).abs().max() > 1e-3


def test_batch_split_rows_equal_their_own_prefix(two_prefixes):
    x = text_inputs(3, 5, pad=1)
    two_prefixes.set_active(ga.BatchSplit("a", "b", batch_sizes=[1, 2]))
    got = _out(two_prefixes, x)
    try:
        two_prefixes.set_active(ga.Stack("a", "b"))
        stacked = _out(two_prefixes, x)
        for name, rows in (("a", slice(0, 1)), ("b", slice(1, 3))):
            two_prefixes.set_active(name)
            torch.testing.assert_close(got[rows], _out(two_prefixes, x)[rows], atol=1e-5, rtol=1e-5)
            assert (stacked[rows] - got[rows]).abs().max() > 1e-3  # Stack prepends both prefixes
    finally:
        two_prefixes.set_active("a")


def test_average_over_prefixes_is_refused(two_prefixes):
    with pytest.raises(SpecError, match="Average is not defined over prefixes"):
        two_prefixes.set_active(ga.Average("a", "b"))
    assert two_prefixes.active_adapters() == ["a"]


def test_stacked_prefixes_export_to_onnx(two_prefixes, tmp_path):
    pytest.importorskip("onnxruntime")
    two_prefixes.set_active(ga.Stack("a", "b"))
    try:
        rep = ga.export_onnx(two_prefixes, tmp_path / "m.onnx", verify=True)
        assert rep.verified
    finally:
        two_prefixes.set_active("a")
