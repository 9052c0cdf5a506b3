"""``--model DIR`` keeps the saved model's head (the class in config.json ``architectures``, or ``--task``)."""

from __future__ import annotations

import onnx
import pytest

import graphadapt as ga
from graphadapt import cli
from graphadapt.cli import main
from graphadapt.zoo import load_model, load_model_with_source
from helpers import HIDDEN, VOCAB, text_inputs, tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    tiny_gpt2(causal_lm=True).save_pretrained(root / "gpt2-lm")
    tiny_bert(num_labels=3).save_pretrained(root / "bert-cls")
    spec = root / "spec.yaml"
    ga.Spec({"t": ga.LoRA(r=2, targets=("q", "v"))}).save(spec)
    return root, spec


def _outputs(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in g.output}


def test_export_of_a_causal_lm_dir_keeps_the_lm_head(dirs, tmp_path, capsys):
    root, spec = dirs
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(root / "gpt2-lm"), "--spec", str(spec), "-o", str(out)]) == 0
    assert "loaded GPT2LMHeadModel (config.json architectures)" in capsys.readouterr().out
    outs = _outputs(out)
    assert list(outs) == ["logits"] and outs["logits"][-1] == VOCAB


@pytest.mark.parametrize("task,cls,key,last_dim", [(None, "BertForSequenceClassification", "logits", 3),
                                                   ("base", "BertModel", "last_hidden_state", HIDDEN)])
def test_classifier_dir_keeps_its_classifier_unless_task_base(dirs, capsys, task, cls, key, last_dim):
    root, spec = dirs
    argv = ["apply", "--model", str(root / "bert-cls"), "--spec", str(spec)] + (["--task", task] if task else [])
    name, model, how = cli._load(cli.build_parser().parse_args(argv))  # what `apply`/`export` load, no capture
    cli._say_loaded(model, how)
    assert f"loaded {cls} ({'--task base' if task else 'config.json architectures'})" in capsys.readouterr().out
    out = ga.apply(model, spec)(**text_inputs(2, 5))
    assert set(out) == ({"logits"} if task is None else {"last_hidden_state", "pooler_output"})
    assert out[key].shape[-1] == last_dim


def test_a_task_the_model_lacks_is_a_clear_error(dirs, capsys):
    root, _ = dirs
    assert main(["inspect", "--model", str(root / "bert-cls"), "--task", "seq2seq-lm"]) == 1
    err = capsys.readouterr().err
    assert "no AutoModelForSeq2SeqLM class for the 'bert' model" in err and "--task" in err


def test_task_on_a_named_tiny_model_builds_its_head_from_the_config():
    m, how = load_model_with_source("tiny-gpt2", "causal-lm")
    assert type(m).__name__ == "GPT2LMHeadModel" and how == "seeded from a config, --task causal-lm"
    assert type(load_model("tiny-gpt2")).__name__ == "GPT2Model"
