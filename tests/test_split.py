"""The ``Split`` block (AdapterHub's: sequence positions divided between children). AdapterHub parity at residual
points: tests/oracle/test_adapterhub_blocks_oracle.py. Here: validation, graphadapt's linear-site definition, ONNX."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import SpecError
from helpers import text_inputs, tiny_bert

torch.set_num_threads(1)


@pytest.mark.parametrize("make,msg", [
    (lambda: ga.Split("a", "b", splits=[2]), "2 children but 1 splits"),
    (lambda: ga.Split("a", "b", splits=[2, 0]), "integers > 0"),
    (lambda: ga.Split("a", splits=[2]), "at least two children"),
    (lambda: ga.Split("a", ga.Fuse("b", "c"), splits=[1, 1]), "Split cannot contain a Fuse"),
    (lambda: ga.Parallel("a", ga.Split("b", "c", splits=1)), "Parallel cannot contain a Split"),
])
def test_bad_splits_are_spec_errors(make, msg):
    with pytest.raises(SpecError, match=msg):
        make()


def test_split_round_trips_and_nests():
    s = ga.Split("a", ga.Stack("b", "c"), splits=3)
    assert s.splits == (3, 3) and s.names() == ("a", "b", "c")
    spec = ga.Spec({n: ga.LoRA(r=2) for n in "abc"}, active=ga.Stack("a", s))
    assert ga.Spec.from_dict(spec.to_dict()).active == spec.active


@pytest.fixture(scope="module")
def split_lora():
    spec = ga.Spec({"l1": ga.LoRA(r=2, init="bert"), "l2": ga.LoRA(r=2, init="bert")},
                   active=ga.Split("l1", "l2", splits=[2, 4]))
    return ga.apply(tiny_bert(seed=0), spec).eval()


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def test_linear_site_split_runs_each_child_on_its_positions(split_lora):
    x = text_inputs(3, 6)
    got = _out(split_lora, x)
    # at the first layer's query projection, positions 0-1 see l1 and 2-5 see l2: check on the site itself
    q = split_lora.get_submodule("adapters._compose.encoder.layer.0.attention.self.query")
    xs = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    w = split_lora.get_parameter("encoder.layer.0.attention.self.query.weight")
    y = xs @ w.T
    l1 = split_lora.get_submodule("adapters.l1.encoder.layer.0.attention.self.query")
    l2 = split_lora.get_submodule("adapters.l2.encoder.layer.0.attention.self.query")
    with torch.no_grad():
        out = q(xs, y, w, None)
        torch.testing.assert_close(out[:, :2], l1(xs[:, :2], y[:, :2], w, None))
        torch.testing.assert_close(out[:, 2:], l2(xs[:, 2:], y[:, 2:], w, None))
        assert (out[:, 2:] - l1(xs[:, 2:], y[:, 2:], w, None)).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"sum to 6, but the sequence has 5 positions"):
        _out(split_lora, text_inputs(3, 5))
    assert got.shape == (3, 6, 32)


def test_split_exports_with_a_fixed_sequence_length(split_lora, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    x = text_inputs(3, 6)
    rep = ga.export_onnx(split_lora, tmp_path / "m.onnx", example_inputs=x, verify=True)
    assert rep.verified
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 6 and isinstance(dims[0], str)  # batch stays dynamic, the sequence is sum(splits)
