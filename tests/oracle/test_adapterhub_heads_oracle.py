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


# --------------------------------------------------------------------------- several heads at once, average_head
def _two_heads(tmp_path, kind="bert"):
    """AdapterHub: adapters ``a``, ``b`` with classification heads ``a``, ``b`` (non-zero, distinct), each saved with
    ``with_head=True``; graphadapt: both adapters and both heads read into one model."""
    from graphadapt import Spec, apply
    from graphadapt.checkpoints.adapterhub import read_adapterhub_adapter
    from graphadapt.checkpoints.adapterhub_heads import read_adapterhub_head

    build, cls = BUILD[kind]
    base = build(seed=0)
    ah = cls(base.config)
    getattr(ah, ah.base_model_prefix).load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(5)
    for i, n in enumerate("ab"):
        ah.add_adapter(n, config="seq_bn")
        ah.add_classification_head(n, num_labels=3)
        assert randomize_adapterhub(ah, n, seed=1 + i) > 0
    with torch.no_grad():
        for p in ah.heads.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ah.eval()
    specs, fills, heads, model = {}, [], [], build(seed=0)
    for n in "ab":
        ah.save_adapter(str(tmp_path / n), n, with_head=True)
        spec, saved, fill = read_adapterhub_adapter(tmp_path / n)
        specs[saved], head = spec, read_adapterhub_head(tmp_path / n)
        model, _ = head.attach(model, saved)
        fills.append((saved, fill))
        heads.append(head)
    return ah, model, specs, fills, heads, apply, Spec


def test_two_heads_batch_split_matches_adapterhub(tmp_path):
    """AdapterHub's ``set_active_adapters(BatchSplit("a", "b"))`` also splits the heads: a MultiHeadOutput, rows
    [0, 1) through adapter+head ``a``, [1, 3) through ``b``; graphadapt: ``import_adapterhub`` of both directories
    (``with_head=True``), BatchSplit adapters, ``active_head`` a BatchSplit of the heads. A list of heads (every head
    on the whole batch) likewise."""
    import graphadapt as ga
    from graphadapt.heads import MultiHeadOutput

    ah = _two_heads(tmp_path)[0]
    dirs = [tmp_path / "a", tmp_path / "b"]
    x = oracle_inputs("bert")
    split = ga.BatchSplit("a", "b", batch_sizes=[1, 2])
    # the head split is the source model's (fixed row counts): captured at that batch size
    adapted = import_adapterhub(tiny_bert(seed=0), dirs, with_head=True, active=split, active_head=split,
                                example_kwargs=x, dynamic=False).eval()
    import adapters.composition as ac
    ah.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[1, 2]))
    with torch.no_grad():
        want, got = ah(**x), adapted(**x)
    assert isinstance(got, MultiHeadOutput) and len(got.head_outputs) == 2
    for w, o in zip(want.head_outputs, got.head_outputs):
        torch.testing.assert_close(o.logits, w.logits, atol=ATOL, rtol=RTOL)
    assert (got[0].logits - got[1].logits[:1]).abs().max() > 1e-3  # the two heads differ
    # a list of heads: every head on the whole batch (adapter a active)
    ah.set_active_adapters("a")
    ah.active_head = ["a", "b"]
    adapted = import_adapterhub(tiny_bert(seed=0), dirs, with_head=True, active="a", active_head=["a", "b"]).eval()
    with torch.no_grad():
        want, got = ah(**x), adapted(**x)
    assert len(got.head_outputs) == len(want.head_outputs) == 2
    for w, o in zip(want.head_outputs, got.head_outputs):
        torch.testing.assert_close(o.logits, w.logits, atol=ATOL, rtol=RTOL)


def test_average_head_matches_adapterhub(tmp_path):
    """AdapterHub 1.3 ``average_head("avg", ["a", "b"], weights=[1, 3])`` (normalised) and graphadapt's
    ``ModelWithHead.average_head``: the same tensors, the same logits."""
    ah, model, specs, fills, heads, apply, Spec = _two_heads(tmp_path)
    for h in heads:  # the imported heads' tensors, before any adapter is applied
        for k, t in h.tensors.items():
            model.get_parameter(h._ours(k)).data.copy_(t)
    ah.average_head("avg", ["a", "b"], weights=[1, 3], set_active=True)
    model.average_head("avg", ["a", "b"], weights=[1, 3], set_active=True)
    ours = dict(model.heads["avg"].state_dict())
    theirs = {k.split("heads.avg.", 1)[1]: v for k, v in ah.state_dict().items() if k.startswith("heads.avg.")}
    assert ours.keys() == theirs.keys() and ours
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-7, rtol=1e-6)
    ah.set_active_adapters("a")
    ah.active_head = "avg"
    adapted = apply(model, Spec({"a": specs["a"]}, active="a", modules_to_save=("heads",)))
    fills[0][1](adapted, "a")
    x = oracle_inputs("bert")
    with torch.no_grad():
        want, got = ah(**x).logits, adapted.eval()(**x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (model.heads["avg"][1].weight - model.heads["a"][1].weight).abs().max() > 1e-3
