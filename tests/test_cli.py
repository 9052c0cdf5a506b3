"""The CLI as a user (or a deployment pipeline) drives it."""

from __future__ import annotations

import json
import re

import onnx
import pytest
import torch

import graphadapt as ga
from graphadapt.cli import EXIT_VERIFY, main
from graphadapt.zoo import load_model
from tests.helpers import perturb_adapters


def test_inspect_table_and_json(capsys):
    assert main(["inspect", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.self_attn.q_proj" in out and "gate" in out and "pre_ln" in out
    assert main(["inspect", "--model", "tiny-t5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["num_layers"] == 4 and len(rep["stacks"]) == 2
    assert any(L["cross_attention"] for L in rep["layers"])


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "--model", "no-such-model"]) == 1
    assert "neither a known name" in capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path):
    spec = ga.Spec({"task": ga.LoRA(r=4, alpha=8, targets=("q", "v")),
                    "bn": ga.SeqBn(reduction_factor=8, init_weights="mam_adapter")})
    spec_path = tmp_path / "spec.yaml"
    spec.save(spec_path)
    ckpt = tmp_path / "ckpt"
    assert main(["apply", "--model", "tiny-bert", "--spec", str(spec_path), "--save", str(ckpt)]) == 0
    # give the saved adapters non-zero weights, as training would
    adapted = ga.load(load_model("tiny-bert"), ckpt)
    perturb_adapters(adapted, seed=3, std=0.05)
    adapted.save_adapters(ckpt)
    return spec_path, ckpt, adapted


def test_export_then_verify_gate(checkpoint, tmp_path, capsys, monkeypatch):
    spec_path, ckpt, adapted = checkpoint
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "tiny-bert", "--adapters", str(ckpt), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[5/5] export fp32 + verify" in text and "folded 4" in text and "kept 2" in text
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert ga.Spec.from_json(meta["graphadapt_spec"]) == ga.Spec.load(spec_path)
    assert meta["graphadapt.merged"] == "true"  # merged by default; verify must merge too (regression below)
    calls = []
    real = ga.AdaptedModel.merge
    monkeypatch.setattr(ga.AdaptedModel, "merge", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(["verify", str(out), "--model", "tiny-bert", "--adapters", str(ckpt)]) == 0
    assert calls, "verify must merge when the export merged"
    monkeypatch.undo()
    # the same file checked against *other* adapter weights must fail the gate
    other = tmp_path / "other"
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("lora_B"):
                p.mul_(-3.0)
    adapted.save_adapters(other)
    assert main(["verify", str(out), "--model", "tiny-bert", "--adapters", str(other)]) == EXIT_VERIFY
    assert "verification FAILED" in capsys.readouterr().err


def test_export_triton(checkpoint, tmp_path):
    _, ckpt, _ = checkpoint
    repo = tmp_path / "repo"
    assert main(["export", "--model", "tiny-bert", "--adapters", str(ckpt), "--triton", str(repo),
                 "--name", "bert", "--max-batch-size", "4"]) == 0
    assert (repo / "bert" / "1" / "model.onnx").exists()
    cfg = (repo / "bert" / "config.pbtxt").read_text()
    assert 'name: "input_ids"' in cfg and "max_batch_size: 4" in cfg


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--model", "tiny-bert", "--steps", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[6/6] latency" in out and "max abs diff" in out and "folded 4 LoRA" in out
    assert (tmp_path / "demo.onnx").exists()


@pytest.mark.parametrize("merge_flag,expect_merged", [("--no-merge", False)])  # "--merge": the gate test above
def test_verify_merges_only_when_the_export_did(checkpoint, tmp_path, monkeypatch, merge_flag, expect_merged):
    """Regression: verify read metadata key ``merged`` while the exporter writes ``graphadapt.merged``, so it
    always merged. It must compare like with like: merge exactly when the ONNX file holds folded weights."""
    _, ckpt, _ = checkpoint
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "tiny-bert", "--adapters", str(ckpt), merge_flag, "-o", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["graphadapt.merged"] == ("true" if expect_merged else "false")
    calls = []
    real = ga.AdaptedModel.merge
    monkeypatch.setattr(ga.AdaptedModel, "merge", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(["verify", str(out), "--model", "tiny-bert", "--adapters", str(ckpt)]) == 0
    assert bool(calls) == expect_merged


def test_generate_demo_learns_to_count_and_onnx_agrees(tmp_path, capsys):
    assert main(["demo", "--task", "generate", "--steps", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime tokens agree with PyTorch: True" in out
    assert "merged model generates the same tokens: True" in out
    before, after = (float(x) for x in re.search(r"before training (\d+)%, after (\d+)%", out).groups())
    assert after > before and after >= 75
    assert (tmp_path / "decoder.onnx").exists()


def test_export_quantized_base_as_matmulnbits(tmp_path, capsys):
    """`--quantize-base nf4 --quantize int4`: QLoRA's base written as MatMulNBits, adapters folded, verified."""
    pytest.importorskip("bitsandbytes")
    spec = ga.Spec({"task": ga.LoRA(r=4, alpha=8, targets=("q", "v"))})
    spec_path = tmp_path / "spec.yaml"
    spec.save(spec_path)
    out = tmp_path / "q.onnx"
    # a dense base cannot be written as MatMulNBits: say which flag quantizes it
    with pytest.raises(SystemExit, match="--quantize-base nf4"):
        main(["export", "--model", "tiny-llama", "--spec", str(spec_path), "--quantize", "int4", "-o", str(out)])
    with pytest.raises(SystemExit, match="drop --triton"):
        main(["export", "--model", "tiny-llama", "--spec", str(spec_path), "--quantize", "int4", "--dtype", "fp16"])
    assert not out.exists()
    capsys.readouterr()
    assert main(["export", "--model", "tiny-llama", "--spec", str(spec_path), "--quantize-base", "nf4",
                 "--quantize", "int4", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    q = rep["quantization"]
    assert rep["verified"] and q["bits"] == 4 and q["base"] and q["nodes"] > 0
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == q["nodes"]
