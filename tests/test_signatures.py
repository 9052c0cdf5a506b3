"""Any call signature of the source model on an adapted model; gradient checkpointing; autocast."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import graphadapt as ga
from graphadapt.signatures import SignatureError, variants

from helpers import randomize_lora, text_inputs, tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def bert_pair():
    """(source, adapted with non-zero LoRA on q/v, merged HF reference)."""
    model = tiny_bert(num_labels=3)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    randomize_lora(adapted)
    return model, adapted, adapted.to_base_model()


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def test_every_call_of_the_source(bert_pair):
    _, adapted, ref = bert_pair
    x = text_inputs(3, 6, pad=2)
    y = torch.tensor([0, 2, 1])
    tt = torch.ones_like(x["input_ids"])
    pos = torch.arange(6).flip(0).expand(3, 6)
    assert "labels" in inspect.signature(adapted.forward).parameters  # Trainer reads it
    with torch.no_grad():
        _close(adapted(**x, labels=y).loss, ref(**x, labels=y).loss)          # the source's own loss
        _close(adapted(**x, token_type_ids=tt).logits, ref(**x, token_type_ids=tt).logits)
        _close(adapted(**x, position_ids=pos).logits, ref(**x, position_ids=pos).logits)
        _close(adapted(input_ids=x["input_ids"]).logits, ref(input_ids=x["input_ids"]).logits)  # mask omitted
        _close(adapted(x["input_ids"], None).logits, ref(x["input_ids"]).logits)  # None = omitted
        _close(adapted(x["input_ids"], x["attention_mask"], tt).logits,       # positional, the source's order
               ref(x["input_ids"], x["attention_mask"], tt).logits)
        out = adapted(**x, output_hidden_states=True, return_dict=False)
        want = ref(**x, output_hidden_states=True, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(want) == 2
    assert len(out[1]) == len(want[1]) == 3
    for a, b in zip(out[1], want[1]):
        _close(a, b)
    # one variant per signature: the positional call with token_type_ids reused the keyword one
    keys = list(variants(adapted))
    assert len(keys) == 5, keys
    with pytest.raises(SignatureError, match="BertForSequenceClassification.forward"):
        adapted(*[x["input_ids"]] * 7)


def test_variant_shares_parameters_and_stays_dynamic():
    model = tiny_bert(num_labels=2)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    one = text_inputs(1, 1)
    out = adapted(**one, labels=torch.tensor([1]))                     # variant captured on batch 1, seq 1
    out.loss.backward()
    lora = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert lora and all(p.grad is not None for p in lora.values())     # grads on the primary's objects
    assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("adapters."))
    (variant,) = variants(adapted).values()
    assert {id(p) for p in variant.parameters()} == {id(p) for p in adapted.parameters()}
    x, y = text_inputs(4, 7), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        got = adapted(**x, labels=y)
    _close(got.loss, model(**x, labels=y).loss)                        # B = 0 at init: the base loss
    assert len(variants(adapted)) == 1                                 # no re-capture for new sizes


def test_variants_follow_merge_set_active_mode_and_copy():
    model = tiny_bert(num_labels=3, hidden_dropout_prob=0.3)
    adapted = ga.apply(model, ga.Spec({"a": ga.LoRA(r=4, targets=("q", "v")), "b": ga.LoRA(r=2, targets=("o",))}))
    randomize_lora(adapted)
    x, y = text_inputs(3, 6), torch.tensor([0, 2, 1])

    def run():
        out = adapted(**x, labels=y)
        return torch.cat([out.loss.reshape(1), out.logits.flatten()])

    with torch.no_grad():
        before = run()
        adapted.merge()
        _close(run(), before, 1e-5)                                    # merged graph, not adapters twice
        adapted.unmerge()
        _close(run(), before)
        adapted.set_active("a")
        assert (run() - before).abs().max() > 1e-3
        adapted.set_active(ga.Stack("a", "b"))                          # a re-plan: the variant follows
        _close(run(), before)
        adapted.set_active(None)
        twin = copy.deepcopy(adapted)
        assert variants(twin) == {}
        _close(twin(**x, labels=y).logits.flatten(), before[1:])
        for p in twin.trainable_parameters().values():
            p.add_(0.5)
        assert (twin(**x, labels=y).logits.flatten() - before[1:]).abs().max() > 1e-3
        _close(run(), before)                                          # the copy has its own adapters
        adapted.train()
        assert (run() - run()).abs().max() > 0                         # dropout on in the variant
        adapted.eval()
        _close(run(), before)


def _saved_tensors(fn) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


def test_gradient_checkpointing_same_gradients_fewer_saved_activations():
    model = tiny_llama(causal_lm=True, attention_dropout=0.2)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v", "down")))
    randomize_lora(adapted)
    adapted.train()
    x = text_inputs(2, 8)
    params = adapted.trainable_parameters()

    def step():
        for p in params.values():
            p.grad = None
        torch.manual_seed(0)
        adapted(**x, labels=x["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in params.items()}

    plain = step()
    saved_plain = _saved_tensors(step)
    assert not adapted.is_gradient_checkpointing
    adapted.gradient_checkpointing_enable()
    assert adapted.is_gradient_checkpointing
    ckpt = step()
    saved_ckpt = _saved_tensors(step)
    for n in plain:
        _close(ckpt[n], plain[n])
    assert saved_ckpt < 0.6 * saved_plain, (saved_ckpt, saved_plain)
    with torch.no_grad():  # inference is unaffected: the primary graph
        adapted.eval()
        _close(adapted(**x).logits, adapted.to_base_model()(**x).logits, 1e-5)
        adapted.train()
    adapted.gradient_checkpointing_disable()
    assert not adapted.is_gradient_checkpointing
    assert _saved_tensors(step) == saved_plain


def test_autocast_bf16_on_cpu(bert_pair):
    model, adapted, ref = bert_pair
    x = text_inputs(3, 6)
    with torch.no_grad():
        full = adapted(**x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = adapted(**x).logits
            base_low = ref(**x).logits
    assert low.dtype == base_low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() < 0.05
    assert not torch.equal(low.float(), full)                          # it really ran in bf16
