"""Quantized bases, second slice (issue 27): ``apply(..., quantize=)`` as a graph pass, merging into a
dense copy (and re-quantizing it), and int4 ``MatMulNBits`` ONNX export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import graphadapt as ga  # noqa: E402
from graphadapt.errors import GraphAdaptError, SpecError  # noqa: E402
from graphadapt.quantized import Packed4bitLinear, base_bytes  # noqa: E402

from helpers import max_diff, text_inputs  # noqa: E402
from test_quantized import VOCAB, _nf4_llama, _reference  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    _nf4_llama(d)
    return d


def _dense(directory):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _bnb(directory, quant_type, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=q, device_map="cpu",
                                                    dtype=torch.float32).eval()


def _packs(model) -> dict[str, Packed4bitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Packed4bitLinear)}


def _nonzero(adapted, value=0.05):
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(value)
    return adapted


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True)])
def test_quantize_pass_stores_the_bytes_transformers_loading_stores(base_dir, quant_type, double_quant):
    dense = _dense(base_dir)
    before = {n: p for n, p in dense.named_parameters()}
    ours = ga.apply(dense, ga.LoRA(r=4, targets=("q", "v")),
                    quantize=ga.Quantize(quant_type, double_quant=double_quant))
    theirs = ga.apply(_bnb(base_dir, quant_type, double_quant), ga.LoRA(r=4, targets=("q", "v")))
    a, b = _packs(ours), _packs(theirs)
    assert len(a) == 2 * 7 and a.keys() == b.keys()  # every layer linear; the output projection stays dense
    for k in a:
        assert (a[k].quant_type, a[k].nested) == (quant_type, double_quant)
        for buf in ("weight_packed", "weight_absmax", "weight_code"):
            assert torch.equal(getattr(a[k], buf), getattr(b[k], buf)), (k, buf)
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        assert max_diff(ours(**x), theirs(**x)) == 0.0
        assert max_diff(ours(**x), dense(**x, use_cache=False)) > 1e-3  # really quantized
    # the caller's model is untouched: same parameter objects, dense, and no packed module
    assert {n: p for n, p in dense.named_parameters()} == before and not _packs(dense)
    stats = base_bytes(ours)
    want = 0.5 + 1 / 64 + 4 / (64 * 256) if double_quant else 0.5 + 4 / 64
    codes = sum(m.weight_code.numel() * 4 + (m.weight_code2.numel() * 4 if m.nested else 0) for m in a.values())
    assert (stats["quantized_bytes"] - codes) / stats["quantized_params"] == pytest.approx(want, rel=0.02)
    assert stats["quantized_params"] == sum(m.in_features * m.out_features for m in a.values())
    # training reaches the adapters only; the packed bytes do not move
    packed = {k: m.weight_packed.clone() for k, m in a.items()}
    ours.train()(**x).logits.square().mean().backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)  # B (A waits on B=0)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if not n.startswith("adapters."))
    assert all(torch.equal(packed[k], m.weight_packed) for k, m in a.items())


def test_int8_quantize_pass_stores_what_load_in_8bit_stores(base_dir):
    """``quantize="int8"``: each row as int8 with its absmax, byte for byte what transformers'
    ``BitsAndBytesConfig(load_in_8bit=True)`` stores, and the same outputs."""
    from graphadapt.quantized import Packed8bitLinear
    from test_quantized import _int8_llama

    def packs(model):
        return {n: m for n, m in model.named_modules() if isinstance(m, Packed8bitLinear)}

    dense = _dense(base_dir)
    ours = _nonzero(ga.apply(dense, ga.LoRA(r=4, targets=("q", "v")), quantize="int8"))
    theirs = _nonzero(ga.apply(_int8_llama(base_dir), ga.LoRA(r=4, targets=("q", "v"))))
    a, b = packs(ours), packs(theirs)
    assert len(a) == 2 * 7 and a.keys() == b.keys()
    for k in a:
        assert a[k].weight_int8.dtype == torch.int8
        assert torch.equal(a[k].weight_int8, b[k].weight_int8) and torch.equal(a[k].weight_scb, b[k].weight_scb), k
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        assert max_diff(ours(**x), theirs(**x)) == 0.0
        assert max_diff(ours(**x), dense(**x, use_cache=False)) > 1e-4  # really quantized (and adapted)
    stats = base_bytes(ours)
    rows = sum(m.out_features for m in a.values())
    assert stats["quantized_bytes"] == stats["quantized_params"] + 4 * rows  # 1 byte per weight + a scale per row
    int8 = {k: m.weight_int8.clone() for k, m in a.items()}
    ours.train()(**x).logits.square().mean().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert all(torch.equal(int8[k], m.weight_int8) for k, m in a.items())
    with pytest.raises(SpecError, match="double_quant"):
        ga.Quantize("int8", double_quant=True)


@pytest.mark.parametrize("bad", ["int3", {"quant_type": "nf4", "blocksize": 48}, 4])
def test_a_bad_quantize_argument_is_refused_naming_it(base_dir, bad):
    with pytest.raises(SpecError, match="quantize"):
        ga.apply(_dense(base_dir), ga.LoRA(r=4, targets=("q",)), quantize=bad)


def test_merge_folds_into_a_dense_copy_and_leaves_the_packed_model_as_it_was(base_dir, tmp_path):
    adapted = _nonzero(ga.apply(_bnb(base_dir, "nf4", False), ga.LoRA(r=4, targets=("q", "v", "down"))))
    x = text_inputs(2, 7, vocab=VOCAB, pad=2)
    with torch.no_grad():
        want = adapted(**x)
    merged = adapted.to_base_model()
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        assert max_diff(merged(**x, use_cache=False), want) < 1e-5
        assert max_diff(merged(**x, use_cache=False), _reference(_bnb(base_dir, "nf4", False), x)) > 1e-3
    adapted.save_merged(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        assert max_diff(_dense(tmp_path / "merged")(**x, use_cache=False), want) < 1e-5
    # the adapted model is back on its packed base, unmerged, with the same outputs
    assert len(_packs(adapted)) == 2 * 7 and not adapted.is_merged
    with torch.no_grad():
        assert max_diff(adapted(**x), want) == 0.0
    with pytest.raises(GraphAdaptError, match="to_base_model"):
        adapted.merge()


def test_requantized_merge_reports_its_error_and_is_exact_for_a_zero_delta(base_dir):
    base = _bnb(base_dir, "nf4", False)  # (with double quantisation the nibbles come back too; the 8-bit scales move by ~1e-5)
    original = {n: m.weight.data.clone() for n, m in base.named_modules() if type(m).__name__ == "Linear4bit"}
    # a fresh LoRA adds nothing: re-quantizing the dequantized NF4 weights gives back the same bytes
    fresh = ga.apply(base, ga.LoRA(r=4, targets=("q", "v"))).to_base_model(requantize=True)
    again = {n: m for n, m in fresh.named_modules() if type(m).__name__ == "Linear4bit"}
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k].weight.data, original[k]) for k in original)
    assert fresh.graphadapt_requantization["max_abs"] == 0.0
    # a trained-looking adapter: the re-quantization error against the dense merge is reported and bounded
    adapted = _nonzero(ga.apply(base, ga.LoRA(r=4, targets=("q", "v", "down"))))
    dense = adapted.to_base_model()
    requant = adapted.to_base_model(requantize="nf4")
    err = requant.graphadapt_requantization
    assert 0.0 < err["max_rel_fro"] < 0.15 and err["max_abs"] > 0.0  # NF4's ~9% relative weight error
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        d, r = _reference(requant, x).logits, dense(**x, use_cache=False).logits
    assert 0.0 < ((d - r).square().mean().sqrt() / r.square().mean().sqrt()).item() < 0.3


@pytest.fixture(scope="module")
def int4_export(base_dir, tmp_path_factory):
    adapted = _nonzero(ga.apply(_dense(base_dir), ga.LoRA(r=4, targets=("q", "v")), quantize="nf4"), 0.02)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    x = text_inputs(2, 9, vocab=VOCAB)
    report = ga.export_onnx(adapted, path, example_inputs=dict(x), merge=False, quantize="int4")
    return adapted, path, report, x


def test_int4_onnx_export_runs_the_base_as_matmulnbits_and_verifies(int4_export):
    import onnx

    adapted, path, report, x = int4_export
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7  # every packed base linear; adapters and lm_head stay MatMul
    assert ops.count("MatMul") >= 2 * 2 * 2  # the LoRA A and B of q and v in both layers, unmerged
    q = report.quantization
    assert report.verified and q["bits"] == 4 and q["nodes"] == 14 and q["base"] == "nf4"
    # exact part: against the PyTorch model over the file's own int4 weights, fp32 tolerances
    assert max(report.max_abs_diff.values()) <= report.atol + report.rtol * 10
    # drift against the packed NF4 model: the price of re-quantizing NF4 to int4, reported and bounded
    assert 0.0 < q["drift_rel_rms"] < 0.3, q


def test_int4_export_refuses_a_dense_base_and_bad_bits(int4_export, base_dir, tmp_path):
    adapted = ga.apply(_dense(base_dir), ga.LoRA(r=4, targets=("q",)))
    with pytest.raises(GraphAdaptError, match="dense"):
        ga.export_onnx(adapted, tmp_path / "d.onnx", quantize="int4")
    with pytest.raises(GraphAdaptError, match="int4"):
        ga.export_onnx(int4_export[0], tmp_path / "b.onnx", quantize="int2")


def test_torchao_int8_weight_only_base(base_dir):
    """A torchao base (``quantize_(model, Int8WeightOnlyConfig())``): captured like a packed base, the
    weight dequantized by the tensor's own ``dequantize()`` (torchao's matmul scales after the product:
    equal to rounding)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from graphadapt.quantized import PackedTorchaoLinear

    model = _dense(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8WeightOnlyConfig())
    qdata = {n: m.weight.qdata.clone() for n, m in model.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        ref = model(**x, use_cache=False)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    assert sum(isinstance(m, PackedTorchaoLinear) for m in adapted.modules()) == len(qdata) == 2 * 7 + 1
    with torch.no_grad():
        assert max_diff(adapted(**x), ref) < 1e-5
    _nonzero(adapted).train()(**x).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.parameters() if p.requires_grad)
    assert all(torch.equal(m.weight.qdata, qdata[n]) for n, m in model.named_modules() if n in qdata)
    with torch.no_grad():
        got = adapted.eval()(**x)
        assert max_diff(got, ref) > 1e-3
        assert max_diff(adapted.to_base_model()(**x, use_cache=False), got) < 1e-5
    assert base_bytes(adapted)["bytes_per_quantized_param"] < 1.2  # int8 + per-row scales


@pytest.fixture(scope="module")
def streamed_int8_export(tmp_path_factory):
    """A merged int8 export of a Llama whose base linears are all above onnxscript's constant-folding limit
    (8192 elements), so every one is a placeholder traced and quantized lazily; dense weights counted."""
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    from graphadapt.exporters.quantized import FileWeightLinear

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    adapted = _nonzero(ga.apply(LlamaForCausalLM(cfg).eval(), ga.LoRA(r=4, targets=("q", "v")), quantize="nf4"),
                       0.02)
    made, alive_max = [], [0]

    def spy(fn):
        def wrapped(*a, **k):
            w = fn(*a, **k)
            alive_max[0] = max(alive_max[0], 1 + sum(r() is not None for r in made))
            made.append(weakref.ref(w))
            return w
        return wrapped

    mp = pytest.MonkeyPatch()
    mp.setattr(Packed4bitLinear, "dequantize", spy(Packed4bitLinear.dequantize))
    mp.setattr(FileWeightLinear, "weight", property(spy(FileWeightLinear.weight.fget)))
    try:
        path = tmp_path_factory.mktemp("onnx8") / "model.onnx"
        x = text_inputs(2, 9, vocab=VOCAB)
        report = ga.export_onnx(adapted, path, example_inputs=dict(x), merge=True, quantize="int8")
    finally:
        mp.undo()
    return adapted, path, report, len(made), alive_max[0]


def test_int8_export_streams_the_base_one_linear_at_a_time_and_merges(streamed_int8_export):
    import onnx

    from graphadapt.exporters.quantized import _module_path, dequantize_matmulnbits

    adapted, path, report, made, alive_max = streamed_int8_export
    packs = _packs(adapted)
    assert len(packs) == 7 and all(m.in_features * m.out_features > 8192 for m in packs.values())
    # every dense weight (dequantized from the packed base, or read back from the file for the reference) is
    # dropped before the next one is made: the export never holds the dense base
    assert made >= 3 * 7 and alive_max <= 2, (made, alive_max)
    q = report.quantization
    assert report.verified and q["bits"] == 8 and q["nodes"] == 7 and report.merged
    assert max(report.max_abs_diff.values()) <= report.atol + report.rtol * 10
    assert 0.0 < q["drift_rel_rms"] < 0.05, q  # int8 over the NF4 values: small
    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    over_weights = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert ops.count("MatMulNBits") == 7 and len(over_weights) == 1  # merged: no adapter MatMul; lm_head dense
    # the file's int8 q_proj is the quantized *merged* weight: within half a step of the dense merge, and
    # away from the unmerged base by the adapter's delta
    node = next(n for n in proto.graph.node
                if n.op_type == "MatMulNBits" and _module_path(n) == "model.layers.0.self_attn.q_proj")
    got = torch.from_numpy(dequantize_matmulnbits(proto, node))
    merged = dict(adapted.to_base_model().named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    base = packs["model.layers.0.self_attn.q_proj"].dequantize()
    step = merged.abs().amax() / 127
    assert (got - merged).abs().max() <= step
    assert (got - base).abs().max() > 4 * step


def test_int4_export_with_swappable_adapters(tmp_path):
    """``quantize="int4", swappable=True``: the adapters are overridable graph inputs over the int4 base; fed
    zeros they drop out, leaving exactly the file's int4 base (the reference over its weights, adapters off)."""
    import numpy as np
    import onnxruntime as ort
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphadapt.exporters import read_swappable
    from graphadapt.exporters.quantized import _int4_reference

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    adapted = _nonzero(ga.apply(LlamaForCausalLM(cfg).eval(), ga.LoRA(r=4, targets=("q", "v")), quantize="nf4"), 0.02)
    x = text_inputs(2, 9, vocab=VOCAB)
    path = tmp_path / "swap.onnx"
    report = ga.export_onnx(adapted, path, example_inputs=dict(x), quantize="int4", swappable=True, max_rank=8)
    q = report.quantization
    assert report.verified and q["nodes"] == 7 and max(report.max_abs_diff.values()) <= report.atol + report.rtol * 10
    _, slots = read_swappable(path)
    assert len(slots) == 4  # A and B of q and v
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in x.items()}
    default = sess.run(None, feeds)[0]
    zero = sess.run(None, {**feeds, **{k: np.zeros(s, np.float32) for k, s in slots.items()}})[0]
    trained = [p for p in adapted.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trained]
    with torch.no_grad():
        for p in trained:
            p.zero_()
        ref = _int4_reference(adapted, path, q["linears"], False, dict(x))[0](**x)
        for p, v in zip(trained, saved):
            p.copy_(v)
    assert max_diff(ref, torch.from_numpy(zero)) < 1e-4
    assert np.abs(default - zero).max() > 1e-3  # the default slots are the exported adapter


def test_the_int4_quantizer_import_leaves_the_root_logger_alone():
    """onnxruntime's quantizer module calls logging.basicConfig(level=INFO) at import: every INFO line of
    the exporter's passes would then print in the user's process."""
    import subprocess
    import sys

    code = ("import logging; from graphadapt.exporters.quantized import _nbits_module; m = _nbits_module(); "
            "r = logging.getLogger(); assert hasattr(m, 'DefaultWeightOnlyQuantizer'); "
            "assert r.level == logging.WARNING and not r.handlers, (r.level, r.handlers)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_other_calls_of_a_quantize_model_run_over_the_packed_base(base_dir, quant):
    """A call other than the captured one (``labels=`` as Trainer passes them, no attention mask) is captured
    on first use from the dense source; it must run over the same packed base (it was refused: "other
    parameters under 'model'")."""
    import torch.nn.functional as F

    adapted = _nonzero(ga.apply(_dense(base_dir), ga.LoRA(r=4, targets=("q", "v")), quantize=quant))
    x = text_inputs(2, 7, vocab=VOCAB)
    x["attention_mask"] = torch.ones_like(x["attention_mask"])
    with torch.no_grad():
        want = adapted(**x).logits
        # no mask is another attention path than an all-ones mask (kernel choice may differ by CPU): fp32 parity
        assert (adapted(input_ids=x["input_ids"]).logits - want).abs().max() < 1e-5
    out = adapted(**x, labels=x["input_ids"])
    assert torch.equal(out.logits.detach(), want)
    ce = F.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), x["input_ids"][:, 1:].reshape(-1))
    assert torch.allclose(out.loss.detach(), ce, atol=1e-6)
    packs = {n: [b.clone() for b in m.buffers()] for n, m in adapted.named_modules()
             if type(m).__name__.startswith("Packed")}
    assert packs
    out.loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)
    for n, m in adapted.named_modules():
        if n in packs:
            assert all(torch.equal(a, b) for a, b in zip(packs[n], m.buffers()))


def test_summary_counts_a_quantized_base_as_its_logical_parameters(base_dir):
    dense = _dense(base_dir)
    spec = ga.LoRA(r=4, targets=("q", "v"))
    want = ga.apply(dense, spec).base_parameter_count()
    assert want == sum(p.numel() for p in dense.parameters())
    for quant in ("nf4", "int8"):
        adapted = ga.apply(dense, spec, quantize=quant)
        assert adapted.base_parameter_count() == want  # packed buffers counted as the weights they hold
        row = next(line for line in adapted.summary(print_fn=None).splitlines() if line.startswith("(base)"))
        assert f"{want:,}" in row


def test_a_failed_int4_check_leaves_the_path_as_it_was(int4_export, tmp_path, monkeypatch):
    """Like every export, the quantized one is written and checked in a temp folder and moved into place only
    once verified: a failed check leaves no file (or the earlier export, byte for byte) and no temp folder."""
    from graphadapt.errors import VerificationError
    from graphadapt.exporters import verify as verify_mod

    adapted, first, report, x = int4_export
    assert report.path == first and first.exists()
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]
    earlier = first.read_bytes()

    def failing(*a, **k):
        raise VerificationError("forced mismatch")

    monkeypatch.setattr(verify_mod, "verify_onnx", failing)
    fresh = tmp_path / "new.onnx"
    for path, kw in ((fresh, {}), (first, {"overwrite": True})):
        with pytest.raises(VerificationError, match="Nothing was written"):
            ga.export_onnx(adapted, path, example_inputs=dict(x), merge=False, quantize="int4", **kw)
    assert not fresh.exists() and first.read_bytes() == earlier
    assert not [p for p in (*tmp_path.iterdir(), *first.parent.iterdir()) if ".tmp-" in p.name]
