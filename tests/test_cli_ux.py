"""The CLI as a user meets it: clear errors on bad input, consistent flags, summaries, --json, exit codes."""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from pathlib import Path

import pytest
import torch

import graphadapt as ga
from graphadapt.cli import EXIT_ERROR, EXIT_OK, EXIT_VERIFY, build_parser, main
from graphadapt.console import EXIT_CODES, Progress
from graphadapt.exporters.triton import parse_config
from graphadapt.zoo import load_model
from helpers import perturb_adapters, tiny_bert


# --------------------------------------------------------------------------- bad input, before the slow part
def test_layer_out_of_range_exits_non_zero(capsys):
    assert main(["inspect", "--model", "tiny-bert", "--why", "q", "--layer", "99"]) == EXIT_ERROR
    assert "--layer 99: tiny-bert has 2 layers, numbered 0..1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert") / "bert"
    tiny_bert().save_pretrained(d)
    return d


@pytest.mark.parametrize("damage", ["truncated config.json", "truncated weights", "garbage weights"])
def test_inspect_on_a_damaged_model_directory_is_a_clear_error(bert_dir, tmp_path, capsys, damage):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(bert_dir, d)
    if damage == "truncated config.json":
        text = (d / "config.json").read_text()
        (d / "config.json").write_text(text[: len(text) // 3])
    else:
        w = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(w[: len(w) // 2] if damage == "truncated weights" else b"\x00junk" * 9)
    assert main(["inspect", "--model", str(d)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "graphadapt: CheckpointError: cannot" in err and "Traceback" not in err
    assert ("config.json" in err) if "config" in damage else ("weights" in err and "truncated or corrupt" in err)


def test_demo_refuses_an_existing_file_before_training(tmp_path, capsys, monkeypatch):
    import graphadapt.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda **k: pytest.fail("the demo trained before refusing --out"))
    f = tmp_path / "report.txt"
    f.write_text("the user's file")
    assert main(["demo", "--model", "tiny-bert", "--out", str(f)]) == EXIT_ERROR
    assert "is an existing file" in capsys.readouterr().err
    assert f.read_text() == "the user's file"


def test_exit_codes_are_documented(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for code in EXIT_CODES:
        assert f"  {code} " in text
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["export", "--no-such-flag"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- heads: --num-labels, new heads
def test_num_labels_sets_the_head(bert_dir, capsys):
    from graphadapt import cli

    args = build_parser().parse_args(["apply", "--model", "tiny-bert", "--task", "seq-cls", "--num-labels", "3"])
    _, model, _ = cli._load(args)
    assert model.classifier.out_features == 3
    args = build_parser().parse_args(["apply", "--model", str(bert_dir), "--task", "token-cls", "--num-labels", "5"])
    _, model, _ = cli._load(args)
    assert model.classifier.out_features == 5
    assert sorted(args.new_params) == ["classifier.bias", "classifier.weight"]  # transformers' report, kept
    assert main(["inspect", "--model", "tiny-bert", "--num-labels", "3"]) == EXIT_ERROR
    assert "--num-labels needs a classification head" in capsys.readouterr().err


def test_a_new_head_is_reported_once_and_restored_from_the_adapters(bert_dir, tmp_path, capfd):
    spec = tmp_path / "spec.yaml"
    ga.Spec({"a": ga.LoRA(r=2)}, task_type="SEQ_CLS").save(spec)
    ckpt = tmp_path / "ck"
    assert main(["apply", "--model", str(bert_dir), "--task", "seq-cls", "--spec", str(spec), "--save",
                 str(ckpt)]) == EXIT_OK
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err  # transformers' own table is replaced by one line
    assert "classifier: newly initialised by transformers, restored from" in out
    assert main(["apply", "--model", str(bert_dir), "--task", "seq-cls", "--adapters", str(ckpt)]) == EXIT_OK
    assert "restored from " + str(ckpt) in capfd.readouterr().out
    plain = tmp_path / "plain.yaml"
    ga.Spec({"a": ga.LoRA(r=2)}).save(plain)
    with pytest.warns(UserWarning, match="newly initialised"):
        assert main(["apply", "--model", str(bert_dir), "--task", "seq-cls", "--spec", str(plain)]) == EXIT_OK
    assert "warning: classifier newly initialised by transformers (random) and not in" in capfd.readouterr().err


# --------------------------------------------------------------------------- export / verify / triton
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    spec = root / "spec.yaml"
    ga.Spec({"task": ga.LoRA(r=4, alpha=8, targets=("q", "v")), "bn": ga.SeqBn(reduction_factor=8)}).save(spec)
    adapted = ga.apply(load_model("tiny-bert"), ga.Spec.load(spec))
    perturb_adapters(adapted, seed=3, std=0.05)
    adapted.save_adapters(root / "ck")
    return root, root / "ck"


@pytest.fixture(scope="module")
def exported(ckpt):
    root, ck = ckpt
    out = root / "m.onnx"
    buf_out, buf_err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["export", "--model", "tiny-bert", "--adapters", str(ck), "-o", str(out), "--json"])
    return rc, buf_out.getvalue(), buf_err.getvalue(), out


def test_export_json_is_the_only_stdout(exported):
    rc, out, err, path = exported
    assert rc == EXIT_OK
    rep = json.loads(out)  # nothing else on stdout
    assert rep["ok"] and rep["verified"] and rep["path"] == str(path) and rep["merged"]
    assert max(rep["max_abs_diff"].values()) <= rep["atol"]
    assert "[5/5] export fp32 + verify" in err and "verified: ONNX = PyTorch within atol=" in err


def test_verify_flags_and_summary(exported, ckpt, capsys):
    _, ck = ckpt
    path = exported[3]
    assert main(["verify", str(path), "--model", "tiny-bert", "--adapters", str(ck)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "VerifyResult(" not in out
    assert "verified: ONNX = PyTorch within atol=0.0001, rtol=0.0001; max abs diff" in out
    assert main(["verify", str(path), "--model", "tiny-bert", "--adapters", str(ck), "--atol", "1e-3", "--rtol",
                 "0", "--json"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["atol"] == 1e-3 and res["rtol"] == 0.0
    # the flags the failure message suggests exist; a file that does not match (other adapter weights)
    # fails the gate (--atol 0 --rtol 0 alone no longer does: fp32 bounds sit on PyTorch's own rounding spread)
    other = ga.apply(load_model("tiny-bert"), ga.Spec.load(ck / ".." / "spec.yaml"))
    perturb_adapters(other, seed=4, std=0.05)
    other.save_adapters(ck.parent / "other")
    assert main(["verify", str(path), "--model", "tiny-bert", "--adapters", str(ck.parent / "other"), "--atol",
                 "1e-4", "--rtol", "0"]) == EXIT_VERIFY
    assert "--atol/--rtol" in capsys.readouterr().err


def _triton_proto():
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    s = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)  # the module alone: tritonclient.grpc's __init__ would need grpcio
    return mod


def test_triton_batching_and_instances(ckpt, capsys):
    root, ck = ckpt
    repo = root / "repo"
    assert main(["export", "--model", "tiny-bert", "--adapters", str(ck), "--triton", str(repo), "--name", "bert",
                 "--max-batch-size", "8", "--dynamic-batching", "--max-queue-delay-us", "100",
                 "--preferred-batch-size", "4", "8", "--instances", "2", "--instance-kind", "cpu"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "verified: ONNX = PyTorch within atol=" in out and "Triton model repository" in out
    text = (repo / "bert" / "config.pbtxt").read_text()
    ours = parse_config(text)
    assert ours["dynamic_batching"] == {"max_queue_delay_microseconds": 100, "preferred_batch_size": [4, 8]}
    assert ours["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    mc = _triton_proto()
    if mc is None:
        pytest.skip("tritonclient is not installed (pip install --no-deps tritonclient; with its deps it pins ml-dtypes<=0.5.4, "
                    "which conflicts with onnx): checked with our parser only, not Triton's own schema")
    from google.protobuf import text_format

    cfg = text_format.Parse(text, mc.ModelConfig())  # Triton's own model-config schema
    assert cfg.max_batch_size == 8 and cfg.platform == "onnxruntime_onnx"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert [i.name for i in cfg.input] == ["input_ids", "attention_mask"] or {i.name for i in cfg.input} >= {
        "input_ids", "attention_mask"}


@pytest.mark.parametrize("argv,msg", [
    (["--dynamic-batching"], "add --triton DIR"),
    (["--triton", "r", "--max-batch-size", "0", "--dynamic-batching"], "needs max_batch_size > 0"),
    (["--triton", "r", "--instances", "0"], "count (an integer >= 1)"),
    (["--triton", "r", "--dynamic-batching", "--preferred-batch-size", "16"], "1..max_batch_size=8"),
])
def test_triton_options_are_checked_before_loading(argv, msg, capsys, monkeypatch):
    from graphadapt import cli

    monkeypatch.setattr(cli, "_adapted", lambda *a: pytest.fail("loaded the model before checking the options"))
    try:
        rc = main(["export", "--model", "tiny-bert", "--spec", "s.yaml", *argv])
    except SystemExit as e:
        rc, err = 1, str(e)
    else:
        err = capsys.readouterr().err
    assert rc == EXIT_ERROR and msg in err


# --------------------------------------------------------------------------- repr, summary, progress
def test_repr_says_what_the_user_has():
    adapted = ga.apply(tiny_bert(num_labels=2), ga.Spec({"a": ga.LoRA(r=2), "b": ga.SeqBn(reduction_factor=4)},
                                                        active=ga.Stack("a", "b"), task_type="SEQ_CLS"))
    text = repr(adapted)
    assert text == str(adapted)
    assert text.startswith("AdaptedModel of BertForSequenceClassification")
    assert "a: LoRA(r=2)" in text and "b: SeqBn(reduction_factor=4.0)" in text
    assert "composition: Stack('a', 'b')" in text and "trained whole (modules_to_save): classifier" in text
    assert "merged: no" in text and "GraphModule" not in text
    assert "trained whole (modules_to_save): classifier (task_type SEQ_CLS)" in adapted.summary(print_fn=None)
    adapted.merge()
    assert "merged: yes" in repr(adapted)


def test_progress_ticks_and_heartbeat():
    buf = io.StringIO()
    p = Progress(1, stream=buf)
    with p.stage("train 8 steps"):
        for i in range(1, 8):
            p.tick(i, 8, f"loss {1 / i:.2f}")
    text = buf.getvalue()
    assert text.startswith("[1/1] train 8 steps … 2/8 (loss 0.50) 4/8 (loss 0.25) 6/8 (loss 0.17) done")

    beat = threading.Event()

    class Stream(io.StringIO):
        def write(self, s):
            if s.endswith(" s"):
                beat.set()
            return super().write(s)

    p = Progress(1, stream=Stream())
    with p.stage("export", heartbeat=0.01):
        assert beat.wait(60), "no elapsed-time line during a long stage"
    assert p.stream.getvalue().rstrip().endswith(")") and " s done (" in p.stream.getvalue()


def test_peft_checkpoint_sizes_the_new_head(bert_dir, tmp_path, capsys):
    """A 3-label PEFT SEQ_CLS checkpoint onto a base directory: --task seq-cls sizes the head from the checkpoint
    (was: a shape mismatch unless the user knew the number of labels)."""
    import warnings

    import peft
    import transformers as T

    T.logging.set_verbosity_error()
    try:
        trained_on = T.BertForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    finally:
        T.logging.set_verbosity_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(trained_on, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "peft")
    assert main(["apply", "--model", str(bert_dir), "--task", "seq-cls", "--peft", str(tmp_path / "peft"),
                 "--json"]) == EXIT_OK
    out = capsys.readouterr()
    assert "--num-labels 3 (the classifier the PEFT checkpoint trained)" in out.err
    assert "classifier: newly initialised by transformers, restored from" in out.err
    assert json.loads(out.out)["spec"]["modules_to_save"] == ["classifier"]
