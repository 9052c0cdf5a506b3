"""PEFT's task types: every default ``modules_to_save`` list imports, and ``Spec(task_type=...)`` trains the head.

PEFT's ``task_type`` adds the task's head names to ``modules_to_save`` (SEQ_CLS and TOKEN_CLS:
``["classifier", "score", "pre_classifier"]``, QUESTION_ANS: ``["qa_outputs"]``) whether the model has
them or not; the importer skips the names the model lacks, as PEFT does.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import graphadapt as ga
from helpers import build_seeded, max_diff, t5_inputs, text_inputs, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")

_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _token_cls():
    return build_seeded(lambda: T.BertForTokenClassification(T.BertConfig(**_BERT, num_labels=5)))


def _qa():
    return build_seeded(lambda: T.BertForQuestionAnswering(T.BertConfig(**_BERT)))


def _t5_lm():
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return build_seeded(lambda: T.T5ForConditionalGeneration(cfg))


#: task type -> (model factory, LoRA targets, inputs, the head PEFT trains whole (None: none))
CASES = {
    "SEQ_CLS": (lambda: tiny_bert(num_labels=3), ["query", "value"], text_inputs, "classifier"),
    "TOKEN_CLS": (_token_cls, ["query", "value"], text_inputs, "classifier"),
    "QUESTION_ANS": (_qa, ["query", "value"], text_inputs, "qa_outputs"),
    "CAUSAL_LM": (lambda: tiny_gpt2(causal_lm=True), ["c_attn"], text_inputs, None),
    "SEQ_2_SEQ_LM": (_t5_lm, ["q", "v"], t5_inputs, None),
    "FEATURE_EXTRACTION": (tiny_bert, ["query", "value"], text_inputs, None),
}


def _peft_checkpoint(task, make, targets, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # LoRA and the head copy PEFT trains: values training would give
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(directory)
    return pm


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    for k in ("logits", "start_logits", "last_hidden_state"):
        if k in out:
            return out[k] if k != "start_logits" else torch.cat([out["start_logits"], out["end_logits"]])
    raise AssertionError(list(out))


@pytest.mark.parametrize("task", list(CASES))
def test_import_every_task_type_matches_peft(task, tmp_path):
    make, targets, inputs, head = CASES[task]
    pm = _peft_checkpoint(task, make, targets, tmp_path)
    saved = pm.peft_config["default"].modules_to_save
    if head == "classifier":  # PEFT's default list, with names BERT does not have
        assert set(saved) == {"classifier", "score", "pre_classifier"}
    adapted = ga.import_peft(make(), tmp_path)
    assert adapted.spec.modules_to_save == ((head,) if head else ())
    x = inputs()
    with torch.no_grad():
        kw = {"use_cache": False} if "use_cache" in adapted.constant_inputs else {}
        ref, got, plain = _logits(pm(**x, **kw)), _logits(adapted(**x)), _logits(make()(**x, **kw))
    assert max_diff(got, ref) <= 1e-5
    assert max_diff(got, plain) > 1e-3  # the adapter (and the head) are really there
    if head is not None:  # the trained head itself came across, not only LoRA
        without = ga.import_peft(make(), tmp_path, ignore_modules_to_save=True)
        with torch.no_grad():
            assert max_diff(_logits(without(**x)), ref) > 1e-3


def test_a_saved_tensor_of_a_missing_head_is_still_an_error(tmp_path):
    _peft_checkpoint("SEQ_CLS", lambda: tiny_bert(num_labels=3), ["query"], tmp_path)
    with pytest.raises(ga.CheckpointError, match="do not exist"):
        ga.import_peft(tiny_bert(), tmp_path)  # BertModel has no classifier; the checkpoint trained one


def test_cli_exports_a_seq_cls_checkpoint_with_peft_logits(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from graphadapt.cli import main

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "base")  # a user's fine-tuning starting point
    pm = _peft_checkpoint("SEQ_CLS", lambda: T.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base"), ["query", "value"], tmp_path / "peft")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "base"), "--peft", str(tmp_path / "peft"), "-o", str(out)]) == 0
    x = text_inputs(3, 6, pad=2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])  # as a BERT tokenizer gives it: a graph input now
    assert names == set(x)
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        ref = pm(**x).logits
    assert got.shape == (3, 3)
    assert max_diff(torch.from_numpy(got), ref) <= 1e-5


# --------------------------------------------------------------------------- Spec(task_type=...)
@pytest.fixture
def fresh_head(tmp_path):
    """BertForSequenceClassification from a BertModel checkpoint: transformers initialises the classifier."""
    tiny_bert().save_pretrained(tmp_path / "base")

    def load():
        T.logging.set_verbosity_error()  # transformers' own "newly initialized" report
        try:
            return T.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
        finally:
            T.logging.set_verbosity_warning()
    return load


def test_forgetting_the_head_is_not_silent(fresh_head):
    with pytest.warns(UserWarning, match=r"classifier was newly initialised.*task_type='SEQ_CLS'"):
        adapted = ga.apply(fresh_head(), ga.LoRA(r=2, targets=("q", "v")))
    assert not adapted.get_parameter("classifier.weight").requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said explicitly: no warning
        ga.apply(fresh_head(), ga.Spec({"a": ga.LoRA(r=2)}, modules_to_save=["classifier"]))
        ga.apply(tiny_bert(num_labels=2), ga.LoRA(r=2))  # built from a config: nothing was loaded


def test_task_type_trains_the_head_as_peft_does(fresh_head, tmp_path):
    spec = ga.Spec({"a": ga.LoRA(r=2, targets=("q", "v"))}, task_type="seq_cls")
    assert spec.task_type == "SEQ_CLS" and ga.Spec.from_json(spec.to_json()) == spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = ga.apply(fresh_head(), spec)
    assert adapted.spec.modules_to_save == ("classifier",)  # score / pre_classifier: absent, skipped
    w = adapted.get_parameter("classifier.weight")
    assert w.requires_grad
    before = w.detach().clone()
    adapted.train()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    x = text_inputs(4, 6)
    torch.nn.functional.cross_entropy(adapted(**x).logits, torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    assert not torch.equal(w.detach(), before)  # the head trains
    adapted.eval().save_adapters(tmp_path / "ck")
    back = ga.load(fresh_head(), tmp_path / "ck")
    with torch.no_grad():
        assert max_diff(back(**x), adapted(**x)) == 0.0  # the trained head is restored


def test_bad_task_type_is_a_clear_error():
    with pytest.raises(ga.SpecError, match="task_type 'SEQ_CLASSIFICATION' is not one of PEFT's"):
        ga.Spec({"a": ga.LoRA()}, task_type="SEQ_CLASSIFICATION")
