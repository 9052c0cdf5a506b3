"""Swappable ONNX adapters: ``export_onnx(swappable=True)`` + ``export_onnx_adapter`` + one onnxruntime session.

One export per model (module fixtures: exports cost tens of seconds on 2 cores). BERT carries four slots —
LoRA (q), DoRA (v, magnitude included), IA3 (k, down) and a SeqBn bottleneck at every residual point — and
Llama two (LoRA q/v, SeqBn). Alternative linear-site adapters of other ranks/alphas at the same sites are built
in the same model (a dormant one is the identity there), so each swapped-in file is checked against a PyTorch
model that runs it natively; the alternative bottleneck is built in a model of its own (a dormant bottleneck
chained at a residual point is not the identity: see the report).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphadapt as ga
from graphadapt.exporters import read_swappable
from tests.helpers import perturb_adapters, text_inputs, tiny_bert, tiny_llama

SLOTS = ["lora", "dora", "ia3", "bn"]
ALT = {"lora": "lora_b", "dora": "dora_b", "ia3": "ia3_b"}
MAX_RANK = 8


def _bert_spec():
    return ga.Spec({
        "lora": ga.LoRA(r=4, alpha=8, targets=["q"]),
        "dora": ga.LoRA(r=2, alpha=4, targets=["v"], use_dora=True),
        "ia3": ga.IA3(targets=["k", "down"], feedforward=["down"]),
        "bn": ga.SeqBn(reduction_factor=8),                          # width 4
        "lora_b": ga.LoRA(r=8, alpha=3, targets=["q"], use_rslora=True),
        "dora_b": ga.LoRA(r=6, alpha=5, targets=["v"], use_dora=True),
        "ia3_b": ga.IA3(targets=["k", "down"], feedforward=["down"]),
        "too_big": ga.LoRA(r=16, targets=["q"]),
        "elsewhere": ga.LoRA(r=2, targets=["k"]),
        "plain_v": ga.LoRA(r=2, targets=["v"]),
    }, active=SLOTS)


@pytest.fixture(scope="module")
def bn_source():
    """A model whose only adapter is another bottleneck (width 2, a constant scaling 0.5 to fold)."""
    model = ga.apply(tiny_bert(), ga.Spec({"bn_b": ga.SeqBn(reduction_factor=16, scaling=0.5)}))
    perturb_adapters(model, seed=2, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap_bert")
    model = ga.apply(tiny_bert(), _bert_spec())
    perturb_adapters(model, seed=1, std=0.2)
    model.eval()
    report = ga.export_onnx(model, d / "bert.onnx", swappable=True, max_rank=MAX_RANK)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(d / "bert.onnx"), opts, providers=["CPUExecutionProvider"])
    return model, report, d, session


def test_swappable_export_lifts_slots_with_exact_zero_padding(bert):
    model, report, d, session = bert
    assert report.verified and max(report.max_abs_diff.values()) < 1e-4  # the defaults are the exported adapters
    meta, shapes = read_swappable(d / "bert.onnx")
    assert set(meta["slots"]) == set(SLOTS) and meta["max_rank"] == MAX_RANK
    # the adapter tensors are overridable inputs (initializers of the same name), not required ones
    required = {i.name for i in session.get_inputs()}
    assert required == {"input_ids", "attention_mask", "token_type_ids"}
    assert {i.name for i in session.get_overridable_initializers()} >= set(shapes)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(d / "bert.onnx")).graph.initializer}
    a = inits["adapters.lora.encoder.layer.0.attention.self.query.lora_A"]
    b = inits["adapters.lora.encoder.layer.0.attention.self.query.lora_B"]
    assert a.shape == (MAX_RANK, 32) and b.shape == (32, MAX_RANK)
    assert np.all(a[4:] == 0) and np.all(b[:, 4:] == 0) and np.any(a[:4] != 0) and np.any(b[:, :4] != 0)
    down = [k for k in inits if k.startswith("adapters.bn.") and k.endswith("adapter_down.weight")]
    assert down and all(inits[k].shape == (MAX_RANK, 32) and np.all(inits[k][4:] == 0) for k in down)
    assert any(k.endswith("lora_magnitude") for k in shapes if k.startswith("adapters.dora."))


def test_swapped_in_files_match_independently_built_adapters(bert):
    """Each alternative adapter (other rank, alpha, rsLoRA, bottleneck width, scaling) goes through the same
    session as a file and matches the PyTorch model that runs it natively; the defaults do not."""
    model, _, d, session = bert
    try:
        for slot, alt in ALT.items():
            f = ga.export_onnx_adapter(model, alt, d / f"{alt}.onnx_adapter", onnx_model=d / "bert.onnx", slot=slot)
            model.set_active([alt if s == slot else s for s in SLOTS])
            res = ga.verify_swappable(d / "bert.onnx", model, f, session=session)
            assert max(res.max_abs_diff.values()) < 1e-4
            with pytest.raises(ga.VerificationError):  # the swap does something: the defaults are another model
                ga.verify_swappable(d / "bert.onnx", model, None, session=session)
    finally:
        model.set_active(SLOTS)


def test_swapped_in_bottleneck_matches_its_own_model(bert, bn_source):
    """A bottleneck of another width and scaling, from a model of its own, into the ``bn`` slot: equal to the
    PyTorch model whose slot runs it (checked against bn_source itself in tests/test_hotswap.py)."""
    model, _, d, session = bert
    f = ga.export_onnx_adapter(bn_source, "bn_b", d / "bn_b.onnx_adapter", onnx_model=d / "bert.onnx", slot="bn")
    ref = copy.deepcopy(model)
    ref.prepare_hot_swap(max_rank=MAX_RANK, names=["bn"])
    ref.hot_swap("bn", bn_source)
    assert max(ga.verify_swappable(d / "bert.onnx", ref, f, session=session).max_abs_diff.values()) < 1e-4
    with pytest.raises(ga.VerificationError):
        ga.verify_swappable(d / "bert.onnx", ref, None, session=session)
    # alone, the file and the bottleneck's own model agree on the bottleneck's contribution direction:
    # the swapped reference differs from the default model
    x = text_inputs()
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    with torch.no_grad():
        assert (ref(**x).last_hidden_state - model(**x).last_hidden_state).abs().max() > 1e-3


def test_fifty_adapters_one_session_no_reexport(bert):
    """50 adapter sets (one file per slot each; LoRA ranks 1..8) through one InferenceSession, each within
    1e-4 of its PyTorch model (the reference model hot-swapped to the same tensors)."""
    model, _, d, session = bert
    ref = copy.deepcopy(model)
    ref.prepare_hot_swap(max_rank=MAX_RANK, names=SLOTS)
    from graphadapt.hotswap import slot_modules

    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for i in range(50):
        for slot in SLOTS:
            state = {}
            for key, mod in slot_modules(ref, slot).items():
                for k, p in mod.named_parameters():
                    t = p.detach() + 0.2 * torch.randn(p.shape, generator=g)
                    if slot == "lora" and k in ("lora_A", "lora_B"):  # rank 1 + i % 8, padded exactly
                        rank = 1 + i % MAX_RANK
                        t = t.clone()
                        (t[rank:] if k == "lora_A" else t[:, rank:]).zero_()
                    state[f"{key}.{k}"] = t
            ref.hot_swap(slot, state)
        files = [ga.export_onnx_adapter(ref, s, d / f"set{i}_{s}.onnx_adapter", onnx_model=d / "bert.onnx",
                                        overwrite=True) for s in SLOTS]
        res = ga.verify_swappable(d / "bert.onnx", ref, files, session=session,
                                  inputs=text_inputs(batch=2, seq=6, seed=i) | {"token_type_ids":
                                                                                torch.zeros(2, 6, dtype=torch.long)})
        worst = max(worst, *res.max_abs_diff.values())
        for f in files:
            os.unlink(f)
    assert worst < 1e-4
    # the session never changed: the file on disk is the one exported once
    assert read_swappable(d / "bert.onnx")[0]["slots"].keys() == set(SLOTS)


def test_adapter_that_does_not_fit_is_refused(bert):
    model, _, d, _ = bert
    with pytest.raises(ga.ExportError, match="rank 16"):
        ga.export_onnx_adapter(model, "too_big", d / "x.onnx_adapter", onnx_model=d / "bert.onnx", slot="lora")
    with pytest.raises(ga.ExportError, match="sites"):
        ga.export_onnx_adapter(model, "elsewhere", d / "x.onnx_adapter", onnx_model=d / "bert.onnx", slot="lora")
    with pytest.raises(ga.ExportError, match="more than rank and scaling"):  # plain LoRA into the DoRA slot
        ga.export_onnx_adapter(model, "plain_v", d / "x.onnx_adapter", onnx_model=d / "bert.onnx", slot="dora")
    with pytest.raises(ga.ExportError, match="no slot"):
        ga.export_onnx_adapter(model, "lora_b", d / "x.onnx_adapter", onnx_model=d / "bert.onnx", slot="nope")
    assert not (d / "x.onnx_adapter").exists()


def test_pack_cli_peft_and_graphadapt_checkpoints(bert, tmp_path):
    """``graphadapt pack`` turns a PEFT checkpoint and a graphadapt one into adapter files for the export."""
    from graphadapt.cli import main

    model, _, d, session = bert
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    model.to_peft(tmp_path / "peft", "lora_b")
    model.save_adapters(tmp_path / "ga", names=["dora_b"])
    out = tmp_path / "packed"
    rc = main(["pack", str(d / "bert.onnx"), "--model", str(base_dir), "--peft", str(tmp_path / "peft"),
               "--slot", "lora", "-o", str(out)])
    assert rc == 0
    rc = main(["pack", str(d / "bert.onnx"), "--model", str(base_dir), "--adapters", str(tmp_path / "ga"),
               "--slot", "dora", "-o", str(out)])
    assert rc == 0
    files = sorted(out.glob("*.onnx_adapter"))
    assert [f.name for f in files] == ["ga.onnx_adapter", "peft.onnx_adapter"]
    try:
        model.set_active(["lora_b", "dora_b", "ia3", "bn"])
        res = ga.verify_swappable(d / "bert.onnx", model, files, session=session)
        assert max(res.max_abs_diff.values()) < 1e-4
    finally:
        model.set_active(SLOTS)


def test_llama_lora_and_bottleneck_slots(tmp_path):
    spec = ga.Spec({"lora": ga.LoRA(r=2, alpha=4, targets=["q", "v"]), "bn": ga.SeqBn(reduction_factor=16),
                    "lora_b": ga.LoRA(r=4, alpha=2, targets=["q", "v"])}, active=["lora", "bn"])
    model = ga.apply(tiny_llama(num_hidden_layers=1), spec)
    perturb_adapters(model, seed=3, std=0.2)
    model.eval()
    path = tmp_path / "llama.onnx"
    report = ga.export_onnx(model, path, swappable=True, max_rank=4)
    assert report.verified
    lora_file = ga.export_onnx_adapter(model, "lora_b", tmp_path / "lora_b.onnx_adapter", onnx_model=path,
                                       slot="lora")
    model.set_active(["lora_b", "bn"])
    assert max(ga.verify_swappable(path, model, lora_file).max_abs_diff.values()) < 1e-4
    # the bottleneck slot: new tensors (width 2 of 4 used, the rest zero) through a hot-swapped reference
    ref = copy.deepcopy(model)
    ref.set_active(["lora", "bn"])
    ref.prepare_hot_swap(max_rank=4, names=["bn"])
    from graphadapt.hotswap import slot_modules

    g = torch.Generator().manual_seed(5)
    state = {}
    for key, mod in slot_modules(ref, "bn").items():
        for k, p in mod.named_parameters():
            state[f"{key}.{k}"] = p.detach() + 0.2 * torch.randn(p.shape, generator=g)
    ref.hot_swap("bn", state)
    bn_file = ga.export_onnx_adapter(ref, "bn", tmp_path / "bn2.onnx_adapter", onnx_model=path)
    assert max(ga.verify_swappable(path, ref, bn_file).max_abs_diff.values()) < 1e-4
    with pytest.raises(ga.VerificationError):
        ga.verify_swappable(path, ref, lora_file)  # the wrong slot swapped: the bottleneck still differs


def test_swappable_refusals(bert, tmp_path):
    model, _, _, _ = bert
    with pytest.raises(ga.ExportError, match="swappable=True"):
        ga.export_onnx(model, tmp_path / "m.onnx", max_rank=4)
    with pytest.raises(ga.ExportError, match="more than max_rank"):
        ga.export_onnx(model, tmp_path / "m.onnx", swappable=True, max_rank=2)
    with pytest.raises(ga.ExportError, match="fp32"):
        ga.export_onnx(model, tmp_path / "m.onnx", swappable=True, dtype="fp16")
    assert not (tmp_path / "m.onnx").exists()
