"""``graphadapt.add_head``: AdapterHub-style prediction heads on a base model (AdapterHub parity: tests/oracle/
test_adapterhub_heads_oracle.py). Heads train with the adapters (``modules_to_save``) and export to ONNX."""

from __future__ import annotations

import pytest
import torch

import graphadapt as ga
from graphadapt.errors import SpecError
from graphadapt.heads import HEAD_TYPES, ModelWithHead, head_config
from helpers import text_inputs, tiny_bert, tiny_gpt2

torch.set_num_threads(1)


def test_classification_head_trains_with_the_adapter_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    model = ga.add_head(tiny_bert(seed=0, hidden_dropout_prob=0.0), "classification", "cls", num_labels=3, seed=1)
    assert isinstance(model, ModelWithHead) and sorted(n for n, _ in model.heads.named_parameters()) == [
        "cls.1.bias", "cls.1.weight", "cls.4.bias", "cls.4.weight"]  # AdapterHub's module indices
    x = text_inputs(3, 6, pad=2)
    with torch.no_grad():
        model.eval()
        hidden = model.bert(**x).last_hidden_state[:, 0]
        want = model.heads.cls[4](torch.tanh(model.heads.cls[1](hidden)))  # dropout, linear, tanh, dropout, linear
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(r=2, targets=("q", "v"), init="gaussian")},
                                      modules_to_save=["heads"]))
    adapted.eval()
    with torch.no_grad():
        got = adapted(**x).logits
    assert got.shape == (3, 3)
    # the head is trainable, the base is not
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert {"heads.cls.1.weight", "heads.cls.4.weight"} <= trainable and not any(n.startswith("bert.") for n in trainable)
    adapted.train()
    loss = adapted(**x).logits.square().sum()
    loss.backward()
    assert adapted.get_parameter("heads.cls.4.weight").grad.abs().sum() > 0
    adapted.eval()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # LoRA's B starts at zero: the head on the base
    rep = ga.export_onnx(adapted, tmp_path / "m.onnx", verify=True)
    assert rep.verified and list(rep.max_abs_diff) == ["logits"]


@pytest.mark.parametrize("head,options,key,shape", [
    ("tagging", {"num_labels": 4}, "logits", (2, 5, 4)),
    ("question_answering", {}, "start_logits", (2, 5)),
    ("causal_lm", {}, "logits", (2, 5, 100)),
])
def test_token_heads_shapes_and_tied_lm_head(head, options, key, shape):
    base = tiny_gpt2(seed=0)
    model = ga.add_head(base, head, **options)
    out = model.eval()(**text_inputs(2, 5))
    assert out[key].shape == shape
    if head == "causal_lm":  # GPT-2 ties the vocabulary projection to the input embeddings, as AdapterHub does
        assert model.heads.head[-1].weight is base.get_input_embeddings().weight


def test_gpt2_classification_reads_the_last_token():
    model = ga.add_head(tiny_gpt2(seed=0), "classification", num_labels=2, seed=3).eval()
    x = text_inputs(2, 5)
    with torch.no_grad():
        h = model.transformer(**x).last_hidden_state
        head = model.heads.head
        torch.testing.assert_close(model(**x).logits, head(h[:, -1]))
        assert (head(h[:, 0]) - head(h[:, -1])).abs().max() > 1e-4


def test_bad_heads_are_clear_errors():
    with pytest.raises(SpecError, match="head type 'regression' is not one graphadapt builds"):
        ga.add_head(tiny_bert(), "regression")
    with pytest.raises(SpecError, match="layers"):
        head_config("classification", layers=0)
    with pytest.raises(SpecError, match="head name"):
        ga.add_head(tiny_bert(), "tagging", name="a.b")
    with pytest.raises(SpecError, match="non_linearity"):
        ga.add_head(tiny_bert(), "classification", activation_function="prelu")
    assert set(HEAD_TYPES) >= {"classification", "tagging", "question_answering", "masked_lm", "causal_lm"}
