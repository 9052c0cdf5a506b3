"""Exporters: ONNX round trip on unseen shapes, fp16, atomic writes, Triton layout, clear errors.

Slow cases (each runs torch.onnx.export on a tiny HF model, ~3-5 s of CPU, T5 ~13 s):
``test_roundtrip[*]`` (10 cases) and ``test_eager_hf_model``. Everything else exports a
toy module in under a second.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphadapt.errors import ExportError, VerificationError
from graphadapt.exporters import (
    DEFAULT_TOLERANCES,
    export_onnx,
    export_triton,
    parse_config,
    triton_config,
    verify_onnx,
)
from graphadapt.exporters import onnx as onnx_exporter

from helpers import t5_inputs, text_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, vit_inputs

D = torch.export.Dim.DYNAMIC


def _captured(name: str):
    """(torch.export(...).module(), example kwargs) for a tiny seeded HF model."""
    if name == "bert":
        model, kw = tiny_bert(), text_inputs(2, 7)
    elif name == "gpt2":  # constant kwargs (use_cache=False) must survive export and verification
        model, kw = tiny_gpt2(), {**text_inputs(2, 7), "use_cache": False}
    elif name == "llama":
        model, kw = tiny_llama(causal_lm=True), {**text_inputs(2, 7), "use_cache": False}
    elif name == "t5":
        # one encoder + one decoder block still has every T5 op (relative bias, cross attention);
        # torch.onnx's decomposition of T5 costs ~6 s of CPU per block
        model, kw = tiny_t5(num_layers=1, num_decoder_layers=1), {**t5_inputs(2, 7, 5), "use_cache": False}
    else:
        model, kw = tiny_vit(), vit_inputs(2)
    dyn = {
        k: (None if not isinstance(v, torch.Tensor) else {0: D} if k == "pixel_values" else {0: D, 1: D})
        for k, v in kw.items()
    }
    gm = torch.export.export(model, (), kw, dynamic_shapes=dyn, strict=False).module()
    return gm, kw


EXPECTED_OUTPUTS = {
    "bert": ["last_hidden_state", "pooler_output"],
    "gpt2": ["last_hidden_state"],
    "llama": ["logits"],
    "t5": ["last_hidden_state", "encoder_last_hidden_state"],
    "vit": ["last_hidden_state", "pooler_output"],
}
ONNX_FLOAT = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}


# fp32 on every architecture; fp16 on one token model and on ViT (float inputs follow the dtype).
# fp16 exports of GPT-2, Llama and T5 run in test_export_adapted.py (merged adapters).
@pytest.mark.parametrize("name,dtype", [(n, "fp32") for n in ("bert", "gpt2", "llama", "t5", "vit")]
                         + [("bert", "fp16"), ("vit", "fp16")])
def test_roundtrip(name, dtype, tmp_path):
    gm, kw = _captured(name)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    path = tmp_path / "model.onnx"
    report = export_onnx(gm, path, example_inputs=kw, dtype=dtype)

    assert path.is_file() and report.path == path and report.verified
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temp files, small model: no external data
    assert report.output_names == EXPECTED_OUTPUTS[name]
    tensor_inputs = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    assert report.input_names == tensor_inputs
    # verification ran on shapes never seen at export: batch 2 -> 3, sequence +3
    for k in tensor_inputs:
        assert report.verify_input_shapes[k][0] == kw[k].shape[0] + 1
        if k != "pixel_values":
            assert report.verify_input_shapes[k][1] == kw[k].shape[1] + 3
    atol, _ = DEFAULT_TOLERANCES[torch.float32 if dtype == "fp32" else torch.float16]
    assert set(report.max_abs_diff) == set(report.output_names)
    assert 0 <= max(report.max_abs_diff.values()) <= atol
    if dtype == "fp32":  # well-conditioned: the rounding-jitter floor stays far below atol, which decides
        assert set(report.noise_floor) == set(report.output_names)
        assert 0 < max(report.noise_floor.values()) < atol / 10
    assert report.node_count == sum(report.op_histogram.values()) > 50
    assert report.opset >= 18 and report.file_size == path.stat().st_size
    assert report.dynamic_axes[tensor_inputs[0]][0] == "batch"
    if name != "vit":
        assert report.dynamic_axes["input_ids"][1] == "sequence"
    if name == "t5":
        assert report.dynamic_axes["decoder_input_ids"] == {0: "batch", 1: "decoder_sequence"}
    assert {"prepare", "export", "save", "check", "verify", "total"} <= set(report.seconds)

    proto = onnx.load(str(path))
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [ONNX_FLOAT[dtype]] * len(
        report.output_names
    )
    inputs = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    if name == "vit":
        assert inputs == {"pixel_values": ONNX_FLOAT[dtype]}  # float inputs follow the export dtype
    else:
        assert set(inputs.values()) == {onnx.TensorProto.INT64}  # ids and masks stay int64
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["graphadapt.dtype"] == dtype and "graphadapt.version" in meta
    # the caller's model is neither converted nor modified
    after = gm.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_eager_hf_model(tmp_path):
    """An eager transformers model exports directly; example inputs come from its config."""
    model = tiny_vit()
    model.train()  # exported in eval mode, and the caller's mode is restored
    report = export_onnx(model, tmp_path / "vit.onnx")
    assert model.training
    assert report.output_names == ["last_hidden_state", "pooler_output"]
    assert report.verify_input_shapes == {"pixel_values": (3, 3, 16, 16)}
    assert report.max_abs_diff["last_hidden_state"] < 1e-4
    assert report.metadata["graphadapt.base_model_class"] == "ViTModel"


def test_captured_module_fp16_keeps_fp32_islands():
    """graphadapt.capture's module: the fp16 export copy keeps HF's deliberate fp32 upcasts."""
    capture = pytest.importorskip("graphadapt.capture").capture
    from graphadapt.exporters._model import example_inputs
    from graphadapt.exporters.dtype import converted_copy

    model, kw = tiny_llama(), text_inputs(2, 7)
    captured = capture(model, example_kwargs=kw)
    half = converted_copy(captured, torch.float16, example_inputs(captured, None))
    upcasts = [
        n for n in half.graph.nodes if n.target is torch.ops.aten.to.dtype and n.args[1] == torch.float32
    ]
    assert len(upcasts) >= 5  # RMSNorm variance per norm, rotary angles
    out = half(**kw).last_hidden_state
    assert out.dtype == torch.float16
    eager = copy.deepcopy(model).half()(**kw).last_hidden_state
    assert (out.float() - eager.float()).abs().max() < 1e-2
    assert next(captured.parameters()).dtype == torch.float32  # the caller's module is untouched


# --------------------------------------------------------------------------- toy models (fast)
class Toy(nn.Module):
    """Embedding + linear: int64 ids in, float hidden states and logits out (as a dict)."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, dim)
            self.proj = nn.Linear(dim, 5)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return {"hidden": h, "logits": self.proj(h)}


def toy_inputs(batch=2, seq=6):
    ids = torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


class MergeableToy(Toy):
    """Duck-typed AdaptedModel: merge() folds a delta into proj, unmerge() restores it."""

    def __init__(self):
        super().__init__()
        self.delta = nn.Parameter(torch.full((5, 8), 0.5))
        self.is_merged = False
        self.calls = []

    def forward(self, input_ids, attention_mask):
        out = super().forward(input_ids, attention_mask)
        if not self.is_merged:
            out["logits"] = out["logits"] + out["hidden"] @ self.delta.T
        return out

    def merge(self):
        self.calls.append("merge")
        with torch.no_grad():
            self.proj.weight += self.delta
        self.is_merged = True

    def unmerge(self):
        self.calls.append("unmerge")
        with torch.no_grad():
            self.proj.weight -= self.delta
        self.is_merged = False

    def example_inputs(self):
        return toy_inputs()

    def graphadapt_metadata(self):
        return {"graphadapt_spec": '{"lora": {"r": 4}}', "source_class": "Toy"}


def test_merge_for_export_and_restore(tmp_path):
    model = MergeableToy()
    weight = model.proj.weight.detach().clone()
    report = export_onnx(model, tmp_path / "m.onnx")
    assert model.calls == ["merge", "unmerge"] and not model.is_merged
    assert torch.allclose(model.proj.weight, weight)
    assert report.merged and report.verified
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["graphadapt_spec"] == '{"lora": {"r": 4}}' and meta["graphadapt.merged"] == "true"
    assert meta["graphadapt.source_class"] == "Toy"
    # the delta was folded: the merged graph has no separate delta matmul
    assert report.op_histogram.get("MatMul", 0) + report.op_histogram.get("Gemm", 0) == 1


def test_merge_is_undone_when_export_fails(tmp_path, monkeypatch):
    model = MergeableToy()
    monkeypatch.setattr(onnx_exporter, "_check", _raise(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(model, tmp_path / "m.onnx")
    assert model.calls == ["merge", "unmerge"] and not model.is_merged


def _raise(exc):
    def f(*a, **k):
        raise exc

    return f


@pytest.mark.parametrize("where", ["check", "commit"])
@pytest.mark.parametrize("external", [False, True])
def test_interrupted_export_keeps_earlier_file(tmp_path, monkeypatch, where, external):
    path = tmp_path / "model.onnx"
    export_onnx(Toy(), path, example_inputs=toy_inputs(), external_data=external, verify=False)
    names = sorted(os.listdir(tmp_path))
    assert names == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
    old = {n: (tmp_path / n).read_bytes() for n in names}

    if where == "check":  # Ctrl-C while the checker runs
        monkeypatch.setattr(onnx.checker, "check_model", _raise(KeyboardInterrupt()))
    else:  # the final rename of the .onnx fails after the weights were already moved
        real_replace = os.replace

        def replace(src, dst):
            if str(dst) == str(path):
                raise OSError("disk vanished")
            return real_replace(src, dst)

        monkeypatch.setattr(onnx_exporter.os, "replace", replace)
    changed = Toy()
    with torch.no_grad():
        changed.proj.weight += 1
    with pytest.raises(KeyboardInterrupt if where == "check" else ExportError):
        export_onnx(changed, path, example_inputs=toy_inputs(), external_data=external, verify=False)
    assert sorted(os.listdir(tmp_path)) == names  # temp dir and parked weights are gone
    assert {n: (tmp_path / n).read_bytes() for n in names} == old


def test_external_data_follows_final_name(tmp_path):
    path = tmp_path / "net.onnx"
    report = export_onnx(Toy(), path, example_inputs=toy_inputs(), external_data=True)
    assert report.external_data == tmp_path / "net.onnx.data" and report.verified
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"net.onnx.data"}
    assert report.file_size == path.stat().st_size + (tmp_path / "net.onnx.data").stat().st_size


def test_fp16_bf16_conversions_leave_model_alone(tmp_path):
    model = Toy()
    report = export_onnx(model, tmp_path / "toy16.onnx", example_inputs=toy_inputs(), dtype="fp16")
    assert report.dtype == "fp16" and report.reference_dtype == "fp16 weights, fp32 compute"
    assert model.proj.weight.dtype == torch.float32
    report = export_onnx(model, tmp_path / "toy_bf16.onnx", example_inputs=toy_inputs(), dtype="bf16", verify=False)
    proto = onnx.load(str(tmp_path / "toy_bf16.onnx"))
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # onnxruntime's CPU provider has no bf16 kernels: verification says so and what to do
        with pytest.raises(VerificationError, match="verify=False|CUDAExecutionProvider"):
            verify_onnx(tmp_path / "toy_bf16.onnx", model, example_inputs=toy_inputs())


def test_verify_existing_file_and_mismatch(tmp_path):
    model = Toy()
    path = tmp_path / "toy.onnx"
    export_onnx(model, path, example_inputs=toy_inputs())
    result = verify_onnx(path, model, example_inputs=toy_inputs(), seed=3)
    assert result.input_shapes["input_ids"] == (3, 9) and result.providers[-1] == "CPUExecutionProvider"
    assert max(result.max_abs_diff.values()) < 1e-5

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.proj.bias += 0.01
    with pytest.raises(VerificationError) as info:
        verify_onnx(path, other, example_inputs=toy_inputs())
    msg = str(info.value)
    assert "'logits'" in msg and "max abs diff 0.01" in msg and "atol=0.0001" in msg
    assert "'hidden'" not in msg  # the unchanged output is not blamed


def test_verification_failure_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "toy.onnx"
    path.write_bytes(b"earlier")
    from graphadapt.exporters import verify as verify_mod

    real = verify_mod.run_onnxruntime

    def perturbed(p, inputs, providers=None, *args, **kwargs):
        outputs, names, used = real(p, inputs, providers, *args, **kwargs)
        return [o + 1.0 for o in outputs], names, used

    monkeypatch.setattr(verify_mod, "run_onnxruntime", perturbed)
    with pytest.raises(VerificationError, match="Nothing was written"):
        # overwrite=True: "earlier" is not a graphadapt export, which the write policy refuses up front otherwise
        export_onnx(Toy(), path, example_inputs=toy_inputs(), overwrite=True)
    assert path.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["toy.onnx"]


def test_unexportable_model_gives_export_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, input_ids, attention_mask):
            if input_ids.sum() > 10:  # branches on tensor values: torch.export cannot capture this
                return input_ids * 2
            return input_ids

    with pytest.raises(ExportError) as info:
        export_onnx(DataDependent(), tmp_path / "x.onnx", example_inputs=toy_inputs())
    msg = str(info.value)
    assert "DataDependent" in msg and "Hint:" in msg and len(msg) < 1200
    assert info.value.__cause__ is not None
    assert os.listdir(tmp_path) == []

    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), tmp_path / "y.onnx")
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(Toy(), tmp_path / "z.onnx", example_inputs=toy_inputs(), dtype="int8")


# --------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_triton_repository(tmp_path, dtype):
    repo = tmp_path / "repo"
    model_dir = export_triton(Toy(), repo, "toy", max_batch_size=16, dtype=dtype, example_inputs=toy_inputs())
    assert model_dir == repo / "toy"
    assert sorted(os.listdir(repo)) == ["toy"]
    assert sorted(os.listdir(model_dir)) == ["1", "config.pbtxt"]
    assert os.listdir(model_dir / "1") == ["model.onnx"]

    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config["name"] == "toy" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    fp = "TYPE_FP32" if dtype == "fp32" else "TYPE_FP16"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input_ids", "TYPE_INT64", [-1]),
        ("attention_mask", "TYPE_INT64", [-1]),
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("hidden", fp, [-1, 8]),
        ("logits", fp, [-1, 5]),
    ]
    # cross-check against the graph: names in order, rank minus the implicit batch axis
    for section, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        assert [c["name"] for c in config[section]] == [v.name for v in values]
        for c, v in zip(config[section], values):
            assert len(c["dims"]) == len(v.type.tensor_type.shape.dim) - 1

    # a second version is added beside the first; re-exporting version 1 replaces only it
    export_triton(Toy(), repo, "toy", max_batch_size=16, dtype=dtype, version=2, example_inputs=toy_inputs())
    assert sorted(os.listdir(model_dir)) == ["1", "2", "config.pbtxt"]


def test_triton_without_batching_and_errors(tmp_path):
    path = tmp_path / "toy.onnx"
    export_onnx(Toy(), path, example_inputs=toy_inputs(), verify=False)
    config = parse_config(triton_config(path, "toy", max_batch_size=0))
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [-1, -1] and config["output"][1]["dims"] == [-1, -1, 5]

    static = tmp_path / "static.onnx"
    export_onnx(Toy(), static, example_inputs=toy_inputs(), dynamic=False, verify=False)
    with pytest.raises(ExportError, match="max_batch_size=0"):
        triton_config(static, "toy", max_batch_size=4)
    with pytest.raises(ExportError, match="name"):
        export_triton(Toy(), tmp_path / "r", "bad name!", example_inputs=toy_inputs())
    # a failed export leaves no half-written model directory
    with pytest.raises(ExportError):
        export_triton(Toy(), tmp_path / "r", "toy", example_inputs=toy_inputs(), dtype="int3")
    assert os.listdir(tmp_path / "r") == []


def test_fresh_inputs_respect_vocab_and_padding(tmp_path):
    from graphadapt.exporters import fresh_inputs

    model = Toy()
    path = tmp_path / "toy.onnx"
    export_onnx(model, path, example_inputs=toy_inputs(), verify=False)
    fresh = fresh_inputs(path, toy_inputs(4, 6), model)
    assert fresh["input_ids"].shape == (5, 9) and int(fresh["input_ids"].max()) < 11
    mask = fresh["attention_mask"]
    assert mask[0].all() and (mask[1:, 0] == 1).all() and mask[1:, -1].eq(0).all()
    ids = np.asarray(fresh["input_ids"])
    assert ids.dtype == np.int64


def test_verification_turns_tf32_off_on_the_cuda_ep_unless_told():
    """onnxruntime's CUDA EP uses TF32 for fp32 by default (1.4e-3 off on an H200); PyTorch does not."""
    from graphadapt.exporters.verify import verification_providers

    assert verification_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    mine = ("CUDAExecutionProvider", {"use_tf32": "1", "device_id": "1"})
    assert verification_providers([mine]) == [mine]
    assert verification_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_low_precision_tolerance_scales_with_pytorchs_own_error():
    """fp16/bf16: the file may be as far from the fp32-compute result as NOISE_FACTOR times PyTorch's
    own low-precision result is, where that exceeds atol/rtol; beyond it, and for a systematic
    shift below it, verification still fails."""
    from graphadapt.exporters.verify import NOISE_FACTOR, compare

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4000, generator=g) * 3
    noise = torch.randn(4000, generator=g) * 0.02          # PyTorch fp16 minus fp32 compute: max ~0.07
    within = (ref + noise * (NOISE_FACTOR * 0.9)).numpy()   # onnxruntime as noisy as allowed
    with pytest.raises(VerificationError):                  # without the floor, atol 0.03 fails it
        compare(["y"], [ref], [within], 0.03, 0.0, rms_tol=4e-3)
    compare(["y"], [ref], [within], 0.03, 0.0, rms_tol=4e-3, noise=[noise])
    with pytest.raises(VerificationError, match="out of tolerance"):
        compare(["y"], [ref], [(ref + noise * NOISE_FACTOR * 1.6).numpy()], 0.03, 0.0, rms_tol=4e-3, noise=[noise])
    with pytest.raises(VerificationError, match="systematic"):   # a 1% shift inside the element bound
        compare(["y"], [ref], [(ref * 1.01).numpy()], 0.03, 0.03, rms_tol=4e-3, noise=[noise * 0.1])


def test_rounding_jitter_perturbs_results_within_ulps_and_keeps_aliasing():
    """fp32 verification's noise floor comes from re-running the reference with every new result
    perturbed by at most JITTER_ULPS·eps (relative); views and in-place writes keep their aliasing
    (KV-cache updates), ±inf mask fills stay, and the same seed gives the same perturbation."""
    from graphadapt.exporters.verify import JITTER_ULPS, RoundingJitter

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact = x @ x
    runs = []
    for seed in (0, 0, 1):
        with RoundingJitter(seed):
            y = x @ x
            buf = torch.zeros(4, 64)
            buf[1:3].copy_(x[:2])                          # an in-place write through a view
            masked = torch.where(x > 0, x, torch.tensor(float("-inf")))
        runs.append(y)
        assert torch.equal(buf[1:3], x[:2]) and torch.equal(buf[0], torch.zeros(64))
        assert torch.isinf(masked).sum() == (x <= 0).sum() and not torch.isnan(masked).any()
    rel = ((runs[0] - exact).abs() / exact.abs().clamp_min(1e-30)).max()
    eps = torch.finfo(torch.float32).eps
    assert 0 < rel <= JITTER_ULPS * eps * 1.01 + eps    # the perturbation, plus its own rounding
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
