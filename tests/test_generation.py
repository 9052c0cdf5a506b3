"""KV-cached capture and ``generate`` on adapted causal LMs (tiny GPT-2 and Llama with GQA).

Greedy tokens equal Hugging Face ``generate`` on the merged weights (``to_base_model``),
batched with left padding, unmerged and merged; sampling is reproducible from a seed and
leaves the global RNG alone; eos/pad handling matches transformers; bad input is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from graphadapt.errors import CaptureError, GraphAdaptError  # noqa: E402
from graphadapt.generation import _warp, past_input_name  # noqa: E402
from helpers import randomize_lora, tiny_gpt2, tiny_llama, tiny_t5  # noqa: E402

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def prompts(batch=3, seq=6, seed=0):
    """Left-padded prompts: example i has i*2 pad positions (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : min(2 * i, seq - 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_greedy(model, ids, mask, n, **kw):
    """transformers' greedy generate with its own defaults (eos/pad from the generation config)."""
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


@pytest.fixture(scope="module", params=list(BUILDERS))
def lm(request):
    """(name, source model, cached adapted model with non-zero LoRA on q/v)."""
    model = BUILDERS[request.param](causal_lm=True)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")), cache=True)
    randomize_lora(adapted, seed=1, std=0.3)
    return request.param, model, adapted


def test_cached_capture_keeps_structure_and_sites(lm):
    name, model, adapted = lm
    plain = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    assert adapted.decoder_cache["num_layers"] == 2
    assert adapted.decoder_cache["kv_heads"] == (2 if name == "llama" else 4)
    assert [r.target for r in adapted.adapter_records] == [r.target for r in plain.adapter_records]
    assert {r.role for r in adapted.adapter_records} == {"q", "v"}
    assert past_input_name(1, "value") in adapted.input_names


def test_prefill_with_empty_cache_matches_hf(lm):
    _, _, adapted = lm
    base = adapted.to_base_model()
    ids, mask = prompts()
    lay = adapted.decoder_cache
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    past = {past_input_name(i, kv): torch.zeros(3, lay["kv_heads"], 0, lay["head_dim"])
            for i in range(lay["num_layers"]) for kv in ("key", "value")}
    with torch.no_grad():
        out = adapted(input_ids=ids, attention_mask=mask, position_ids=pos, **past)
        ref = base(input_ids=ids, attention_mask=mask, position_ids=pos)
    keep = mask.bool()
    torch.testing.assert_close(out["logits"][keep], ref.logits[keep], atol=1e-5, rtol=1e-5)
    assert out["present.0.key"].shape == (3, lay["kv_heads"], 6, lay["head_dim"])


@pytest.mark.parametrize("merged", [False, True])
def test_greedy_equals_hf_generate_left_padded(lm, merged):
    _, model, adapted = lm
    base = adapted.to_base_model()
    ids, mask = prompts()
    want = hf_greedy(base, ids, mask, 8)
    assert not torch.equal(want, hf_greedy(model, ids, mask, 8)), "LoRA must change the tokens"
    if merged:
        adapted.merge()
    try:
        got = adapted.generate(ids, mask, max_new_tokens=8)
    finally:
        if merged:
            adapted.unmerge()
    assert torch.equal(got, want)


BEAMS = [dict(num_beams=3),
         dict(num_beams=4, num_return_sequences=3, length_penalty=0.5),
         dict(num_beams=3, early_stopping=True, eos="a"),
         dict(num_beams=3, num_return_sequences=2, length_penalty=2.0, eos="b", pad_token_id=5),
         dict(num_beams=2, early_stopping="never", length_penalty=-1.0, eos="ab")]


def test_beam_search_equals_hf_generate_left_padded(lm):
    """Beam search (length penalty, early stopping modes, several eos ids, n returned) = transformers' tokens."""
    _, _, adapted = lm
    base = adapted.to_base_model()
    ids, mask = prompts()
    free = adapted.generate(ids, mask, max_new_tokens=6)
    eos_of = {"a": int(free[0, ids.shape[1] + 1]), "b": int(free[1, ids.shape[1] + 1])}
    stopped = False
    for kw in BEAMS:
        kw = dict(kw)
        if "eos" in kw:
            kw["eos_token_id"] = [eos_of[c] for c in kw.pop("eos")]
        ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            return_dict_in_generate=True, output_scores=True, **kw)
        got, scores = adapted.generate(ids, mask, max_new_tokens=8, output_scores=True, **kw)
        assert torch.equal(got, ref.sequences), kw
        assert got.shape[0] == 3 * kw.get("num_return_sequences", 1)
        torch.testing.assert_close(scores, ref.sequences_scores, atol=1e-4, rtol=1e-5)
        if "eos_token_id" in kw:  # some returned beam ended with eos before the length limit
            new = got[:, ids.shape[1]:-1]
            stopped |= bool(torch.isin(new, torch.tensor(kw["eos_token_id"])).any())
    assert stopped, "an eos must end some beam early"
    greedy = adapted.generate(ids, mask, max_new_tokens=8)
    assert not torch.equal(adapted.generate(ids, mask, max_new_tokens=8, num_beams=4), greedy)
    adapted.merge()
    try:
        assert torch.equal(adapted.generate(ids, mask, max_new_tokens=8, num_beams=3),
                           base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3))
    finally:
        adapted.unmerge()


def test_eos_and_pad_like_hf(lm):
    _, _, adapted = lm
    base = adapted.to_base_model()
    ids, mask = prompts()
    free = adapted.generate(ids, mask, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # the second token of example 0 ends that sequence
    want = hf_greedy(base, ids, mask, 6, eos_token_id=eos, pad_token_id=1)
    got = adapted.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, want)
    assert (got[0, ids.shape[1] + 2:] == 1).all()


def test_uncached_model_generates_through_a_tied_twin():
    model = tiny_gpt2(causal_lm=True)
    adapted = ga.apply(model, ga.LoRA(r=4))
    ids, mask = prompts(batch=2)
    randomize_lora(adapted, seed=2, std=0.3)
    first = adapted.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(first, hf_greedy(adapted.to_base_model(), ids, mask, 6))
    randomize_lora(adapted, seed=5, std=0.3)  # "training" after the twin exists is seen by generate
    second = adapted.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(second, hf_greedy(adapted.to_base_model(), ids, mask, 6))
    assert not torch.equal(first, second)
    adapted.set_active([])  # inactive adapters: the base model's tokens
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=6), hf_greedy(model, ids, mask, 6))
    adapted.set_active(None)
    adapted.merge()
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=6), second)


def test_merged_uncached_model_folds_its_twin_once_and_refolds_on_change():
    """A merged plain capture generates through a merged twin: folded once, not on every call (each
    re-fold re-ran two graph recompiles, ~1.4x HF per token on a tiny Llama); an in-place edit of an
    adapter weight or a new merge re-folds; the twin never leaves the adapter weights frozen."""
    from graphadapt.generation import generation_twins

    model = tiny_gpt2(causal_lm=True)
    adapted = ga.apply(model, ga.LoRA(r=4))
    randomize_lora(adapted, seed=2, std=0.3)
    ids, mask = prompts(batch=2)
    adapted.merge()
    first = adapted.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(first, hf_greedy(adapted.to_base_model(), ids, mask, 6))
    (twin,) = generation_twins(adapted)
    folded = {n: p for n, p in twin.named_parameters() if n in adapted._merge_state["backups"]}
    assert folded
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=6), first)
    assert all(dict(twin.named_parameters())[n] is p for n, p in folded.items())  # not folded again
    with torch.no_grad():  # an in-place edit of a tied adapter weight while merged: the twin re-folds
        next(p for n, p in adapted.named_parameters() if n.endswith("lora_B")).mul_(-3.0)
    edited = adapted.generate(ids, mask, max_new_tokens=6)
    assert not any(dict(twin.named_parameters())[n] is p for n, p in folded.items())
    adapted.unmerge()
    assert all(p.requires_grad for n, p in adapted.named_parameters() if n.startswith("adapters."))
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=6), edited)  # unmerged: same weights
    assert not torch.equal(edited, first)
    assert all(p.requires_grad for n, p in adapted.named_parameters() if n.startswith("adapters."))


def test_bottleneck_and_ia3_cached_match_uncached_recompute():
    model = tiny_llama(causal_lm=True)
    spec = ga.Spec({"ia3": ga.IA3(), "bn": ga.SeqBn(reduction_factor=4, init_weights="bert")}, seed=0)
    cached = ga.apply(model, spec, cache=True)
    plain = ga.apply(model, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if n.startswith("adapters."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        mine = dict(cached.named_parameters())
        for n, p in plain.named_parameters():
            if n.startswith("adapters."):
                mine[n].copy_(p)
    ids = torch.randint(3, 99, (2, 5), generator=g)
    got = cached.generate(ids, max_new_tokens=5)
    seq = ids  # O(n^2) reference: full recompute on the uncached capture, no padding
    with torch.no_grad():
        for _ in range(5):
            logits = plain(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
    assert not torch.equal(got, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_sampling_reproducible_and_isolated(lm):
    _, _, adapted = lm
    ids, mask = prompts()
    state = torch.get_rng_state()
    a = adapted.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=7, temperature=1.5)
    b = adapted.generate(ids, mask, max_new_tokens=8, do_sample=True,
                         generator=torch.Generator().manual_seed(7), temperature=1.5)
    c = adapted.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=8, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = adapted.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=1, seed=3), greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.5), (1.0, 50, 0.05)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.clone()
    want = TemperatureLogitsWarper(temperature)(None, want)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = _warp(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])
    assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_bad_input_is_refused(lm):
    _, _, adapted = lm
    ids, mask = prompts()
    right = torch.flip(mask, [1])
    with pytest.raises(GraphAdaptError, match="pad prompts on the left"):
        adapted.generate(ids, right, max_new_tokens=2)
    with pytest.raises(GraphAdaptError, match="num_return_sequences"):
        adapted.generate(ids, mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(GraphAdaptError, match="beam sampling"):
        adapted.generate(ids, mask, num_beams=2, do_sample=True)
    with pytest.raises(GraphAdaptError, match="early_stopping"):
        adapted.generate(ids, mask, num_beams=2, early_stopping="sometimes")
    with pytest.raises(GraphAdaptError, match="temperature"):
        adapted.generate(ids, mask, do_sample=True, temperature=0.0)
    with pytest.raises(GraphAdaptError, match="input_ids"):
        adapted.generate(ids.float(), mask)


def tiny_t5_lm(seed=0):
    import transformers as T

    from helpers import HEADS, HIDDEN, INTERMEDIATE, LAYERS, VOCAB, build_seeded

    cfg = T.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
                     num_decoder_layers=LAYERS, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1)
    return build_seeded(lambda: T.T5ForConditionalGeneration(cfg), seed)


def test_t5_greedy_equals_hf_generate_padded_unmerged_and_merged():
    model = tiny_t5_lm()
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "k", "v", "o")))
    randomize_lora(adapted, seed=1, std=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    want = hf_greedy(adapted.to_base_model(), ids, mask, 8)
    assert not torch.equal(want, hf_greedy(model, ids, mask, 8)), "LoRA must change the tokens"
    got = adapted.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(got, want)
    enc, step = adapted.__dict__["_generation_twins"]
    assert all(r.target.split(".")[2] == "encoder" for r in enc.adapter_records)
    assert {r.target.split(".")[7] for r in step.adapter_records} == {"SelfAttention", "EncDecAttention"}
    beams = dict(num_beams=3, num_return_sequences=2, length_penalty=0.5, eos_token_id=int(got[0, 3]))
    want_beams = adapted.to_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **beams)
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=8, **beams), want_beams)
    adapted.merge()
    assert torch.equal(adapted.generate(ids, mask, max_new_tokens=8), want)
    a = adapted.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=1)
    assert torch.equal(a, adapted.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=1))


def test_encoder_decoder_cache_capture_points_to_generate():
    with pytest.raises(CaptureError, match="adapted.generate"):
        ga.apply(tiny_t5_lm(), ga.LoRA(r=2), cache=True)
    with pytest.raises(CaptureError, match="did not return logits"):  # T5Model: no LM head
        ga.apply(tiny_t5(), ga.LoRA(r=2), cache=True)


def test_fp16_generate_matches_hf_fp16_and_checkpoints_interchange(tmp_path):
    model = tiny_llama(causal_lm=True)
    ids, mask = prompts(batch=2)
    plain = ga.apply(model, ga.LoRA(r=4))
    randomize_lora(plain, seed=2, std=0.3)
    plain.save_adapters(tmp_path / "ck")
    cached = ga.apply(model, ga.LoRA(r=4), cache=True)
    cached.load_adapters(tmp_path / "ck")  # same adapter names with and without the cache
    assert torch.equal(cached.generate(ids, mask, max_new_tokens=6), plain.generate(ids, mask, max_new_tokens=6))
    base = cached.to_base_model().half()
    cached.to(torch.float16)
    got, scores = cached.generate(ids, mask, max_new_tokens=6, output_scores=True)
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got, ref.sequences)
    assert (scores - torch.stack(ref.scores).float()).abs().max() < 3e-2
    assert not torch.equal(got, hf_greedy(model, ids, mask, 6))


def test_prefix_tuning_generates_with_the_kv_cache():
    """Prefix tuning on the cached graph: greedy decoding with the cache gives the tokens of a full-recompute
    loop over the uncached adapted graph, and differs from the base model's."""
    lm = tiny_gpt2(causal_lm=True)
    adapted = ga.apply(lm, ga.Spec({"p": ga.PrefixTuning(prefix_length=3)}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    adapted.eval()
    ids = torch.randint(3, 100, (2, 5), generator=g)
    out = adapted.generate(ids, torch.ones_like(ids), max_new_tokens=6)
    out = out[0] if isinstance(out, tuple) else out
    cur = ids
    for _ in range(6):
        with torch.no_grad():
            logits = adapted(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
        cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, cur)
    base = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(base, cur)
