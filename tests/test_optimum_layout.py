"""``export_onnx(..., layout="optimum")`` and ``graphadapt export --layout optimum``: the directory Optimum's
ORTModel classes load (config.json, model.onnx with Optimum's names, tokenizer files), checked here in the main
env with onnxruntime; tests/oracle/test_optimum_oracle.py loads such directories with Optimum itself.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers as T

import graphadapt as ga
from graphadapt.cli import main
from graphadapt.console import EXIT_OK
from graphadapt.errors import ExportError
from graphadapt.exporters.optimum_layout import optimum_task
from helpers import perturb_adapters, tiny_bert, tiny_llama
from test_pipeline import TEXTS, tiny_tokenizer

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """``graphadapt export --layout optimum`` of a 3-label BERT classifier with trained (perturbed) adapters."""
    root = tmp_path_factory.mktemp("optimum")
    tiny_bert(seed=0, num_labels=3).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "tok")
    adapted = ga.apply(T.AutoModelForSequenceClassification.from_pretrained(root / "base"), ga.LoRA(r=4)).eval()
    perturb_adapters(adapted, seed=3, std=0.5)
    adapted.save_adapters(root / "ck")
    rc = main(["export", "--model", str(root / "base"), "--task", "seq-cls", "--adapters", str(root / "ck"),
               "--layout", "optimum", "--tokenizer", str(root / "tok"), "-o", str(root / "out")])
    assert rc == EXIT_OK
    return root / "out", adapted


def test_cli_writes_what_optimum_reads_and_the_session_gives_the_adapted_logits(cli_export, capsys):
    out, adapted = cli_export
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and len(cfg["id2label"]) == 3
    # transformers 4 (Optimum's) has no "TokenizersBackend" class: the export names the class it loads as
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = T.AutoTokenizer.from_pretrained(out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]  # ORTModelForSequenceClassification reads "logits"
    enc = tok(TEXTS, padding=True, return_tensors="np")
    got = sess.run(None, dict(enc))[0]  # tokenizer output feeds the session unchanged
    with torch.no_grad():
        want = adapted(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
        with adapted.disable_adapters():
            base = adapted(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want - base).max() > 1e-4  # the adapters are in the export (10x the tolerance)


def test_optimum_task_comes_from_the_source_class():
    def fake(cls, **cfg):
        return types.SimpleNamespace(source_class=f"transformers.{cls}", config=types.SimpleNamespace(**cfg))

    assert optimum_task(fake("BertForSequenceClassification")) == "text-classification"
    assert optimum_task(fake("RobertaForTokenClassification")) == "token-classification"
    assert optimum_task(fake("BertForQuestionAnswering")) == "question-answering"
    assert optimum_task(fake("LlamaForCausalLM")) == "text-generation"
    assert optimum_task(fake("GPT2LMHeadModel")) == "text-generation"
    assert optimum_task(fake("BertModel")) == "feature-extraction"
    with pytest.raises(ExportError, match="encoder-decoder"):
        optimum_task(fake("T5ForConditionalGeneration", is_encoder_decoder=True))
    with pytest.raises(ExportError, match="pass task="):
        optimum_task(fake("BertForMaskedLM"))


def test_bad_layouts_and_paths_are_refused_before_any_export(tmp_path):
    adapted = ga.apply(tiny_bert(num_labels=2), ga.LoRA(r=2))
    with pytest.raises(ExportError, match="layout must be one of 'file', 'optimum'"):
        ga.export_onnx(adapted, tmp_path / "m", layout="onnx")
    with pytest.raises(ExportError, match="are for layout='optimum'"):
        ga.export_onnx(adapted, tmp_path / "m.onnx", tokenizer=tiny_tokenizer())
    with pytest.raises(ExportError, match="writes a directory"):
        ga.export_onnx(adapted, tmp_path / "m.onnx", layout="optimum")
    with pytest.raises(ExportError, match="does not exist"):
        ga.export_onnx(adapted, tmp_path / "no" / "dir", layout="optimum")
    with pytest.raises(ExportError, match="task must be one of"):
        ga.export_onnx(adapted, tmp_path / "d", layout="optimum", task="summarization")
    assert not (tmp_path / "d").exists()


def test_a_cache_optimum_would_size_wrong_is_refused(tmp_path):
    """Optimum feeds the first step an empty past of hidden_size // heads per head (for Llama): a model whose
    head_dim differs would fail at run time, so the export refuses it and says why."""
    lm = ga.apply(tiny_llama(causal_lm=True, head_dim=16), ga.LoRA(r=2), cache=True)
    with pytest.raises(ExportError, match=r"2 heads x 8 per head .* cache has 2 x 16"):
        ga.export_onnx(lm, tmp_path / "lm", layout="optimum")
    assert not (tmp_path / "lm").exists()


def test_cli_layout_flags_are_checked_before_loading(monkeypatch, capsys):
    from graphadapt import cli

    monkeypatch.setattr(cli, "_adapted", lambda *a: pytest.fail("loaded the model before checking the options"))
    for argv, msg in [(["--tokenizer", "t"], "are for --layout optimum"),
                      (["--layout", "optimum"], "give it with -o DIR"),
                      (["--layout", "optimum", "-o", "d", "--triton", "r"], "leave out --triton")]:
        with pytest.raises(SystemExit, match=msg):
            main(["export", "--model", "tiny-bert", "--spec", "s.yaml", *argv])


def test_a_task_whose_outputs_the_model_lacks_leaves_nothing_behind(cli_export, tmp_path):
    _, adapted = cli_export
    with pytest.raises(ExportError, match=r"reads \['start_logits', 'end_logits'\]"):
        ga.export_onnx(adapted, tmp_path / "qa", layout="optimum", task="question-answering", verify=False)
    assert not (tmp_path / "qa").exists()
