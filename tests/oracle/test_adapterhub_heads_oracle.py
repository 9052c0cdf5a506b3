"""AdapterHub prediction heads (``save_adapter(..., with_head=True)``) imported by ``graphadapt.import_adapterhub``.

Each case: an AdapterHub flexible-head model (``BertAdapterModel``, ``GPT2AdapterModel``, ``LlamaAdapterModel``) over
the same seeded base as a plain transformers model gets a bottleneck adapter ``"a"`` and a head ``"a"``; every
adapter and head tensor is set non-zero random, ``save_adapter(dir, "a", with_head=True)`` writes both. graphadapt
imports them onto the plain base model: the head's logits match AdapterHub's (1e-5, eval), and differ from the same model
without the adapter.
"""

from __future__ import annotations

import pytest
import torch

import adapters  # noqa: F401  (registers the AdapterHub model classes)
from adapters import BertAdapterModel, GPT2AdapterModel, LlamaAdapterModel

from graphadapt import import_adapterhub
from graphadapt.errors import CheckpointError
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": (tiny_bert, BertAdapterModel), "gpt2": (tiny_gpt2, GPT2AdapterModel),
         "llama": (tiny_llama, LlamaAdapterModel)}


def _ah_model(kind: str, head: str, options: dict, adapter="seq_bn"):
    build, cls = BUILD[kind]
    base = build(seed=0)
    ah = cls(base.config)
    missing, unexpected = getattr(ah, ah.base_model_prefix).load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("prompt_tuning" in k for k in missing)
    ah.add_adapter("a", config=adapter)
    getattr(ah, f"add_{head}_head")("a", **options)
    assert randomize_adapterhub(ah, "a", seed=1) > 0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ah.heads.parameters():  # a tied vocabulary projection moves the embeddings too, as in AdapterHub
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ah.set_active_adapters("a")
    ah.eval()
    return ah


def _inputs(kind, head):
    x = oracle_inputs(kind)
    if head == "multiple_choice":
        x = {k: v.reshape(1, 3, -1) for k, v in x.items()}
    return x


CASES = {
    "bert-classification": ("bert", "classification", {"num_labels": 3}),
    "bert-classification-pooler": ("bert", "classification", {"num_labels": 3, "use_pooler": True, "layers": 1}),
    "bert-multilabel": ("bert", "classification", {"num_labels": 4, "multilabel": True, "activation_function": "relu"}),
    "bert-tagging": ("bert", "tagging", {"num_labels": 5, "layers": 2}),
    "bert-qa": ("bert", "qa", {}),
    "bert-multiple-choice": ("bert", "multiple_choice", {"num_choices": 3}),
    "bert-masked-lm": ("bert", "masked_lm", {}),
    "gpt2-classification": ("gpt2", "classification", {"num_labels": 3}),
    "gpt2-causal-lm": ("gpt2", "causal_lm", {}),
    "llama-classification": ("llama", "classification", {"num_labels": 2}),
    "llama-tagging": ("llama", "tagging", {"num_labels": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_head_import_matches_adapterhub(case, tmp_path):
    kind, head, options = CASES[case]
    ah = _ah_model(kind, head, options)
    ah.save_adapter(str(tmp_path), "a", with_head=True)
    x = _inputs(kind, head)
    adapted = import_adapterhub(BUILD[kind][0](seed=0), tmp_path,
                                example_kwargs=x if head == "multiple_choice" else None)
    adapted.eval()
    keys = ("start_logits", "end_logits") if head == "qa" else ("logits",)
    with torch.no_grad():
        want, got = ah(**x), adapted(**x)
        ah.set_active_adapters(None)
        ah.active_head = "a"
        no_adapter = ah(**x)
    for k in keys:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL)
        assert (got[k] - no_adapter[k]).abs().max() > 1e-3  # the adapter acts
    # the head is trained whole with the adapter, as AdapterHub's train_adapter leaves heads trainable
    assert adapted.spec.modules_to_save == ("heads.a",)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(n.startswith("heads.a.") for n in trainable)
    # the saved head values landed (a head left at its initialisation would not give AdapterHub's logits above)
    sd = adapted.state_dict()
    for k, v in ah.heads.state_dict().items():
        torch.testing.assert_close(sd[f"heads.{k}"], v, atol=0, rtol=0)


def test_with_head_false_leaves_the_base_outputs(tmp_path):
    ah = _ah_model("bert", "classification", {"num_labels": 3})
    ah.save_adapter(str(tmp_path), "a", with_head=True)
    adapted = import_adapterhub(tiny_bert(seed=0), tmp_path, with_head=False)
    assert "last_hidden_state" in adapted(**oracle_inputs("bert")) and not adapted.spec.modules_to_save


def test_static_head_fills_the_models_own_classifier(tmp_path):
    """A transformers ``BertForSequenceClassification`` with ``adapters.init`` saves its own ``classifier``."""
    import adapters as ah_lib

    ah = tiny_bert(seed=0, num_labels=3)
    ah_lib.init(ah)
    ah.add_adapter("a", config="seq_bn")
    randomize_adapterhub(ah, "a", seed=1)
    with torch.no_grad():
        ah.classifier.weight.add_(0.5)
    ah.set_active_adapters("a")
    ah.eval()
    ah.save_adapter(str(tmp_path), "a", with_head=True)
    adapted = import_adapterhub(tiny_bert(seed=0, num_labels=3), tmp_path)
    adapted.eval()
    x = oracle_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).logits, ah(**x).logits, atol=ATOL, rtol=RTOL)
    assert adapted.spec.modules_to_save == ("classifier",)
    with pytest.raises(CheckpointError, match="no parameters of BertModel"):
        import_adapterhub(tiny_bert(seed=0), tmp_path, with_head=True)  # required: the bare model cannot take it
    with pytest.warns(UserWarning, match="without it"):  # by default the adapter comes alone, said aloud
        bare = import_adapterhub(tiny_bert(seed=0), tmp_path)
    assert bare.spec.modules_to_save == () and not any("classifier" in k for k in bare.state_dict())
