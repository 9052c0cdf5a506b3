"""ReFT (LoReFT / NoReFT / DiReFT) at layer outputs (and, in the shared ONNX export, the invertible adapter): placement, position semantics, training (R stays orthonormal),
save/load, merge (refused, reported) and ONNX export verified in onnxruntime on padded inputs of a new shape.
AdapterHub parity is in tests/oracle/test_adapterhub_reft_oracle.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphadapt as ga
from graphadapt.vocab import SiteKind
from helpers import text_inputs, tiny_bert, tiny_gpt2


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def _randomize(adapted, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters.") and not n.endswith("projection_original"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_positions_follow_the_mask_and_only_chosen_positions_change_at_the_last_layer():
    model = tiny_gpt2()
    x = text_inputs(3, 7, seed=2, pad=3)    # rows 0, 2: 7 real tokens; row 1: 4
    base = _out(model, x)
    adapted = ga.apply(model, ga.Spec({"r": ga.NoReft(layers=(1,), prefix_positions=2, suffix_positions=1, r=2,
                                                       dropout=0.0)})).eval()
    recs = adapted.adapter_records
    assert [(r.kind, r.layer) for r in recs] == [(SiteKind.HIDDEN, 1)]
    changed = (_out(adapted, x) - base).abs().amax(-1) > 1e-4       # last layer: no later layer mixes positions
    want = torch.zeros(3, 7, dtype=torch.bool)
    want[:, :2] = True
    want[[0, 2], 6] = True
    want[1, 3] = True                                                 # row 1's last real token
    assert torch.equal(changed, want)
    adapted.set_active([])
    torch.testing.assert_close(_out(adapted, x), base)


def test_orthogonal_projection_trains_and_stays_orthonormal():
    model = tiny_bert()
    x = text_inputs(2, 6, seed=1)
    adapted = ga.apply(model, ga.Spec({"r": ga.LoReft(r=3, suffix_positions=1)}))
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    assert params and all(n.startswith("adapters.") for n, p in adapted.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.5)
    unit = adapted.get_submodule(adapted.adapter_records[0].target).units[0]
    before = unit.rotation().detach().clone()
    for _ in range(2):
        opt.zero_grad()
        adapted(**x).last_hidden_state.pow(2).mean().backward()
        opt.step()
    rot = unit.rotation().detach()
    assert (rot - before).abs().max() > 1e-4                          # R moved …
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-5, rtol=0)   # … and stays orthonormal


def test_save_load_round_trip_and_merge_keeps_the_intervention(tmp_path):
    model = tiny_bert()
    x = text_inputs(3, 6, seed=4, pad=2)
    spec = ga.Spec({"r": ga.DiReft(prefix_positions=1, suffix_positions=2, r=2, tied_weights=True,
                                   non_linearity="relu")})
    adapted = ga.apply(model, spec).eval()
    _randomize(adapted)
    want = _out(adapted, x)
    assert (want - _out(model, x)).abs().max() > 1e-2
    adapted.save_adapters(tmp_path / "a")
    loaded = ga.load(tiny_bert(), tmp_path / "a").eval()
    torch.testing.assert_close(_out(loaded, x), want)
    adapted.merge()                                                   # nothing to fold: the module stays
    torch.testing.assert_close(_out(adapted, x), want)


def test_bad_specs_are_clear():
    with pytest.raises(ga.SpecError, match="both 0"):
        ga.Reft(prefix_positions=0, suffix_positions=0)
    with pytest.raises(ga.SpecError, match="non_linearity"):
        ga.Reft(non_linearity="nope")
    with pytest.raises(ga.SpecError, match="r < hidden"):
        ga.apply(tiny_bert(), ga.Spec({"r": ga.LoReft(r=32)}))
    with pytest.raises(ga.SpecError, match="no layer selected"):
        ga.apply(tiny_bert(), ga.Spec({"r": ga.LoReft(layers=(7,))}))
    assert ga.Spec.from_json(ga.Spec({"r": ga.DiReft(r=2)}).to_json()).adapters["r"] == ga.DiReft(r=2)


@pytest.fixture(scope="module")
def reft_onnx(tmp_path_factory):
    """One export for both hidden-state methods: ReFT at layer outputs and an invertible adapter (NICE block) at
    the embedding output, both active."""
    pytest.importorskip("onnxruntime")
    adapted = ga.apply(tiny_bert(), ga.Spec({"r": ga.LoReft(prefix_positions=2, suffix_positions=1, r=2),
                                             "inv": ga.InvertibleAdapter()})).eval()
    _randomize(adapted)
    path = tmp_path_factory.mktemp("reft") / "m.onnx"
    return adapted, path, ga.export_onnx(adapted, path, example_inputs=text_inputs(2, 7, seed=3, pad=2))


def test_onnx_export_verifies_on_padded_inputs_of_another_shape(reft_onnx):
    import onnxruntime as ort

    adapted, path, rep = reft_onnx
    assert rep.verified
    x = text_inputs(3, 5, seed=9, pad=2)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: v.numpy() for k, v in x.items() if k in names})[0]
    want = _out(adapted, x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for only in (["r"], ["inv"]):                                     # each exported adapter does something
        adapted.set_active(only)
        assert np.abs(got - _out(adapted, x).numpy()).max() > 1e-2
    adapted.set_active(["r", "inv"])
