"""QLoRA from a checkpoint larger than memory: ``apply(hollow_model(ckpt), spec, quantize=...)`` reads each
hollow base weight from the checkpoint, quantizes it and drops it (graphadapt.quantized.quantize_linears), reads
the tensors it does not quantize into place (graphadapt.hollow.fill_hollow), and equals the same apply over the
fully loaded model bit for bit. And a hollow adapted model never computes silently wrong numbers: its forward,
training, merge() and to_base_model() refuse (graphadapt.hollow)."""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import graphadapt as ga  # noqa: E402
from graphadapt.errors import CheckpointError  # noqa: E402
from graphadapt.hollow import HOLLOW_MARK  # noqa: E402
from graphadapt.outofcore import hollow_model, weight_source  # noqa: E402
from graphadapt.quantized import Packed4bitLinear, base_bytes, dense_base  # noqa: E402

from helpers import text_inputs, tiny_llama  # noqa: E402

SPEC = ga.LoRA(r=4, alpha=8, targets=("all-linear",))
SMALL = 64  # the tiny model's linear weights, embeddings and lm_head stay hollow; norms are read
LINEARS = 2 * 7


def _loaded(directory):
    import transformers as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16).eval()


def _nonzero_b(adapted, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted


def _packs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Packed4bitLinear)}


def _state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("qload")
    tiny_llama(causal_lm=True).half().save_pretrained(root / "ckpt", max_shard_size="30KB")
    assert len(list((root / "ckpt").glob("model-*.safetensors"))) >= 2
    return root / "ckpt"


@pytest.fixture(scope="module")
def pair(ckpt):
    """The NF4 QLoRA model over the fully loaded checkpoint, and over its hollow model (adapters equal)."""
    ref = _nonzero_b(ga.apply(_loaded(ckpt), SPEC, quantize="nf4")).eval()
    hollow = hollow_model(ckpt, small=SMALL)
    hollow_before = set(hollow.graphadapt_hollow)
    reads = hollow.graphadapt_checkpoint.reads
    got = _nonzero_b(ga.apply(hollow, SPEC, quantize="nf4")).eval()
    return {"ref": ref, "got": got, "hollow": hollow, "before": hollow_before,
            "reads": hollow.graphadapt_checkpoint.reads - reads}


@pytest.mark.parametrize("quantize", ["nf4", ga.Quantize("fp4", double_quant=True)], ids=["nf4", "fp4-double"])
def test_quantizing_from_the_checkpoint_equals_quantizing_the_loaded_model(ckpt, pair, quantize):
    if quantize == "nf4":
        ref, got, hollow, reads, before = pair["ref"], pair["got"], pair["hollow"], pair["reads"], pair["before"]
    else:
        ref = _nonzero_b(ga.apply(_loaded(ckpt), SPEC, quantize=quantize)).eval()
        hollow = hollow_model(ckpt, small=SMALL)
        before, r0 = set(hollow.graphadapt_hollow), hollow.graphadapt_checkpoint.reads
        got = _nonzero_b(ga.apply(hollow, SPEC, quantize=quantize)).eval()
        reads = hollow.graphadapt_checkpoint.reads - r0
    # every hollow tensor was read exactly once: 14 linears (quantized) + embeddings and lm_head (read into place)
    assert len(before) == LINEARS + 2 and reads == len(before)
    assert hollow.graphadapt_hollow == {n for n in before if "proj" in n}  # the quantized ones stay unread there
    assert HOLLOW_MARK not in got.__dict__ and weight_source(got) is None  # nothing hollow left in the model
    with dense_base(got):  # what merge and export see: dequantized weights, nothing read from the checkpoint
        assert weight_source(got) is None
    a, b = _packs(got), _packs(ref)
    assert len(a) == LINEARS and a.keys() == b.keys()
    for k in a:  # packed nibbles, block scales (and their 8-bit state), code tables: bit-identical
        assert (a[k].quant_type, a[k].nested) == (b[k].quant_type, b[k].nested)
        sa, sb = _state(a[k]), _state(b[k])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), k
    sa, sb = _state(got), _state(ref)  # embeddings, norms, lm_head, adapters: the same values too
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert base_bytes(got) == base_bytes(ref)
    x = text_inputs(2, 7)
    with torch.no_grad():
        want = ref(**x).logits
        have = got(**x).logits
        with ref.disable_adapters():
            plain = ref(**x).logits
    assert torch.isfinite(have).all() and torch.equal(have, want)
    assert not torch.equal(have, plain)  # the adapters (non-zero B) take part


def test_a_qlora_model_from_the_checkpoint_trains_and_merges_like_the_loaded_one(pair, tmp_path):
    ref, got = pair["ref"], pair["got"]
    x = text_inputs(2, 7)
    for m in (ref, got):
        m.zero_grad()
        m.train()(**x).logits.float().square().mean().backward()
        m.eval()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    g_got = {n: p.grad for n, p in got.named_parameters() if p.requires_grad}
    assert g_got.keys() == g_ref.keys() and all(torch.equal(g_got[n], g_ref[n]) for n in g_ref)
    assert any(g.abs().sum() > 0 for g in g_got.values())
    # dense merge: to_base_model and save_merged read the dequantized base and the read embeddings
    with torch.no_grad():
        want = ref.to_base_model()(**x, use_cache=False).logits
        have = got.to_base_model()(**x, use_cache=False).logits
    assert torch.equal(have, want)
    ref.save_merged(tmp_path / "ref")
    got.save_merged(tmp_path / "got")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "got" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_are_read_once_and_stay_tied(tmp_path):
    tiny_llama(causal_lm=True, tie_word_embeddings=True).half().save_pretrained(tmp_path / "tied")
    ref = _nonzero_b(ga.apply(_loaded(tmp_path / "tied"), SPEC, quantize="nf4")).eval()
    hollow = hollow_model(tmp_path / "tied", small=SMALL)
    got = _nonzero_b(ga.apply(hollow, SPEC, quantize="nf4")).eval()
    assert hollow.lm_head.weight is hollow.model.embed_tokens.weight
    assert "model.embed_tokens.weight" not in hollow.graphadapt_hollow
    x = text_inputs(2, 7)
    with torch.no_grad():
        assert torch.equal(got(**x).logits, ref(**x).logits)


def test_a_hollow_adapted_model_refuses_to_compute(ckpt, tmp_path):
    """Without quantize= the base weights stay in the checkpoint: every way of computing with them is refused,
    naming what to use instead (the streamed paths are tested in test_out_of_core.py)."""
    adapted = _nonzero_b(ga.apply(hollow_model(ckpt, small=SMALL), SPEC))
    x = text_inputs(2, 7)
    assert len(adapted.__dict__[HOLLOW_MARK]) == LINEARS + 2
    with pytest.raises(CheckpointError, match="never read.*quantize="):
        adapted.eval()(**x)
    with pytest.raises(CheckpointError, match="never read"):  # training: the forward refuses first
        adapted.train()(**x)
    adapted.eval()
    with pytest.raises(CheckpointError, match="merge\\(\\).*save_merged_from_checkpoint"):
        adapted.merge()
    assert not adapted.is_merged
    with pytest.raises(CheckpointError, match="to_base_model\\(\\)"):
        adapted.to_base_model()
    with pytest.raises(CheckpointError, match="save_merged_from_checkpoint"):
        adapted.save_merged(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(CheckpointError, match="optimize_for_inference"):
        ga.optimize_for_inference(adapted)
    import pickle

    with pytest.raises(CheckpointError, match="pickling"):  # not a file of unread weights
        pickle.dumps(adapted)
    import copy

    with pytest.raises(CheckpointError, match="never read"):  # a copy keeps the mark
        copy.deepcopy(adapted)(**x)


def test_initialisations_that_read_the_base_read_the_checkpoint(ckpt):
    """Over a hollow base (no quantize=), DoRA's magnitude (the base weight's row norms) is computed from the
    checkpoint's values, as over the loaded model, and plain LoRA reads nothing at all."""
    dora = ga.LoRA(r=4, targets=("q", "v"), use_dora=True)
    ref = ga.apply(_loaded(ckpt), dora)
    hollow = hollow_model(ckpt, small=SMALL)
    r0 = hollow.graphadapt_checkpoint.reads
    got = ga.apply(hollow, dora)
    assert hollow.graphadapt_checkpoint.reads - r0 == 4  # q and v of both layers, once each
    mags = {n: p for n, p in got.named_parameters() if "magnitude" in n}
    want = dict(ref.named_parameters())
    assert len(mags) == 4 and all(torch.equal(p, want[n]) and p.abs().sum() > 0 for n, p in mags.items())
    r0 = hollow.graphadapt_checkpoint.reads
    plain = ga.apply(hollow, SPEC)
    assert hollow.graphadapt_checkpoint.reads == r0
    plain.add_adapter("d", ga.LoRA(r=4, targets=("q",), use_dora=True))  # re-planning reads it there too
    assert hollow.graphadapt_checkpoint.reads - r0 == 2
    mags = {n: p for n, p in plain.named_parameters() if "magnitude" in n}
    assert len(mags) == 2 and all(torch.equal(p, want[n.replace(".d.", ".default.")]) for n, p in mags.items())


def test_generate_runs_the_packed_base(ckpt, pair):
    """generate() re-captures a model built without cache=True from its (dense or hollow) source: over a
    quantize= base the re-capture quantizes too and then runs this model's own packed modules (it once
    decoded over the dense base); cache=True quantizes the cached graph itself, from the checkpoint, and
    decodes exactly as the same model over the loaded checkpoint."""
    x = text_inputs(1, 5)
    recaptured = pair["got"].generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=4,
                                      do_sample=False)
    twin = pair["got"].__dict__["_generation_twins"][0]
    mine = _packs(pair["got"])
    assert len(mine) == len(_packs(twin)) == LINEARS and all(m is mine[n] for n, m in _packs(twin).items())
    outs = [recaptured]
    for base in (hollow_model(ckpt, small=SMALL), _loaded(ckpt)):
        cached = ga.apply(base, SPEC, quantize="nf4", cache=True).eval()
        assert len(_packs(cached)) == LINEARS and HOLLOW_MARK not in cached.__dict__
        own = dict(pair["got"].named_parameters())
        with torch.no_grad():
            for n, p in cached.named_parameters():
                if "lora_" in n:
                    p.copy_(own[n])
        outs.append(cached.generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=4,
                                    do_sample=False))
    assert outs[0].shape == (1, 9) and torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_a_pickled_quantize_model_comes_back_quantized(pair):
    """pickle rebuilds an adapted model from its source + spec + adapters: a quantize= model must be rebuilt
    quantized (before, it came back over the dense source: other outputs, no error)."""
    import pickle

    x = text_inputs(2, 7)
    for m in (pair["ref"], pair["got"]):
        back = pickle.loads(pickle.dumps(m))
        a, b = _packs(back), _packs(m)
        assert len(a) == LINEARS and a.keys() == b.keys()
        assert all(torch.equal(a[k].weight_packed, b[k].weight_packed) for k in a)
        with torch.no_grad():  # bit-equal: the rebuild keeps each tensor's dtype (the fp32 rotary buffer too)
            assert torch.equal(back(**x).logits, m(**x).logits)
