"""QLoRA: graphadapt adapters over a bitsandbytes 4-bit (NF4) base, on CPU (issue 27, first slice)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import graphadapt as ga  # noqa: E402
from graphadapt.errors import GraphAdaptError  # noqa: E402
from graphadapt.quantized import Packed4bitLinear  # noqa: E402

from helpers import max_diff, text_inputs  # noqa: E402

VOCAB = 128


def _nf4_llama(directory, double_quant: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if not (directory / "config.json").exists():
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(directory)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=q, device_map="cpu",
                                                    dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    _nf4_llama(d)
    return d


def _reference(model, x):
    """bitsandbytes' own fp32 path: dequantize, then a dense matmul. (In eval mode on AVX512-BF16 CPUs,
    bitsandbytes instead repacks the weight in place and runs a bf16 kernel, ~1e-3 away.)"""
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            return model(**x, use_cache=False)
    finally:
        model.train(was)


def _packed(model) -> dict[str, torch.Tensor]:
    return {n: p.data.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}


def test_capture_keeps_the_base_packed_and_the_callers_model_untouched(base_dir, tmp_path):
    model = _nf4_llama(base_dir)
    before = _packed(model)
    linear_types = {type(m) for m in model.modules() if type(m).__name__ == "Linear4bit"}
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))
    quant = [m for m in adapted.modules() if isinstance(m, Packed4bitLinear)]
    assert len(quant) == 2 * 7  # every linear of both layers captured as a packed 4-bit site
    # the caller's modules are back as they were: Params4bit weights, class forwards
    assert linear_types and all(type(m.weight).__name__ == "Params4bit" and "forward" not in m.__dict__
                                for m in model.modules() if type(m) in linear_types)
    # packed storage is shared with the caller's model, not copied
    ptrs = {p.data.data_ptr() for p in model.parameters() if p.dtype == torch.uint8}
    assert {m.weight_packed.data_ptr() for m in quant} <= ptrs
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        assert max_diff(adapted(**x), _reference(model, x)) < 1e-5  # fresh LoRA: B = 0
    assert all(torch.equal(before[n], p.data) for n, p in model.named_parameters() if n in before)
    # merging into the packed weights themselves is refused, naming the dense ways (test_quantized_pass.py)
    for merge in (adapted.merge, lambda: adapted.merge(in_place=True)):
        with pytest.raises(GraphAdaptError, match="to_base_model"):
            merge()
    assert not adapted.is_merged
    # a float cast changes the compute dtype (block scales keep theirs)
    with torch.no_grad():
        ref = adapted(**x)
        assert max_diff(adapted.to(torch.bfloat16)(**x), ref) < 5e-2


def _trained_peft(model, tmp_path, **cfg):
    """PEFT LoRA over ``model`` with seeded non-zero adapter weights, saved (test_import_peft's helper)."""
    from test_import_peft import _trained_peft as trained

    return trained(lambda: model, {"target_modules": ["q_proj", "v_proj", "down_proj"], **cfg}, tmp_path)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_lora_over_nf4_imports_with_equal_outputs(base_dir, tmp_path, dora):
    pm = _trained_peft(_nf4_llama(base_dir), tmp_path / "peft", use_dora=dora)
    base = _nf4_llama(base_dir)
    adapted = ga.import_peft(base, tmp_path / "peft")
    x = text_inputs(3, 6, vocab=VOCAB, pad=2)
    with torch.no_grad():
        got = adapted(**x)
    ref, plain = _reference(pm, x), _reference(base, x)
    assert max_diff(got, ref) < 1e-5
    assert max_diff(got, plain) > 1e-3  # the adapter is really there


def test_a_base_bitsandbytes_repacked_for_cpu_inference_is_refused_clearly(base_dir):
    model = _nf4_llama(base_dir)
    x = text_inputs(2, 7, vocab=VOCAB)
    with torch.no_grad():
        model(**x, use_cache=False)  # eval forward: bitsandbytes may repack its weights for its CPU kernel
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if type(m).__name__ == "Linear4bit"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(GraphAdaptError, match="repacked"):
        ga.apply(model, ga.LoRA(r=4, targets=("q", "v")))


@pytest.mark.parametrize("double_quant", [False, True])
def test_training_moves_adapters_only_and_lowers_the_loss(tmp_path, double_quant):
    model = _nf4_llama(tmp_path, double_quant=double_quant)
    before = _packed(model)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v", "down")))
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.is_floating_point() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = text_inputs(4, 8, vocab=VOCAB)
    labels = x["input_ids"]
    adapted.train()
    losses = []
    for _ in range(5):
        out = adapted(**x)
        logits = out["logits"] if isinstance(out, dict) else out.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = _packed(model)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)  # packed base bit-identical
    # at rest a captured 4-bit linear holds its packed nibbles plus block scales: 0.5 + 4/64 bytes per
    # parameter for NF4 in blocks of 64; double quantisation stores the scales in 8 bits (+ fp32 per 256 blocks)
    quant = [m for m in adapted.modules() if isinstance(m, Packed4bitLinear)]
    params = sum(m.in_features * m.out_features for m in quant)
    stored = sum(b.numel() * b.element_size() for m in quant for n, b in m.named_buffers() if "code" not in n)
    want = 0.5 + 1 / 64 + 4 / (64 * 256) + 4 * len(quant) / params if double_quant else 0.5 + 4 / 64
    assert stored / params == pytest.approx(want, rel=0.02)


def _int8_llama(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _nf4_llama(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                    device_map="cpu", dtype=torch.float32).eval()


def test_8bit_base_peft_parity_training_and_merge(base_dir, tmp_path):
    """bitsandbytes ``Linear8bitLt``: the weight is int8 rows times their absmax/127, as bitsandbytes' CPU
    matmul computes (its eval path instead quantizes the activations to int8 too, ~4e-3 away)."""
    from graphadapt.quantized import Packed8bitLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = _trained_peft(_int8_llama(base_dir), tmp_path / "peft")
        base = _int8_llama(base_dir)
        before = {n: p.data.clone() for n, p in base.named_parameters() if p.dtype == torch.int8}
        adapted = ga.import_peft(base, tmp_path / "peft")
        assert sum(isinstance(m, Packed8bitLinear) for m in adapted.modules()) == 2 * 7
        x = text_inputs(2, 7, vocab=VOCAB, pad=2)
        with torch.no_grad():
            got = adapted(**x)
            assert max_diff(got, _reference(pm, x)) < 1e-5
            assert max_diff(got, _reference(base, x)) > 1e-3
        adapted.train()(**x).logits.square().mean().backward()
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
        assert all(n.startswith("adapters.") for n, p in adapted.named_parameters() if p.requires_grad)
        assert before and all(torch.equal(before[n], p.data) for n, p in base.named_parameters() if n in before)
        with torch.no_grad():
            assert max_diff(adapted.eval().to_base_model()(**x, use_cache=False), got) < 1e-5


@pytest.mark.parametrize("spec", [ga.IA3(), ga.SeqBn(reduction_factor=4), ga.PrefixTuning(prefix_length=3)],
                         ids=["ia3", "seq_bn", "prefix"])
def test_other_methods_train_over_nf4(base_dir, spec):
    model = _nf4_llama(base_dir)
    before = _packed(model)
    adapted = ga.apply(model, spec).train()
    adapted(**text_inputs(2, 7, vocab=VOCAB)).logits.square().mean().backward()
    trainable = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), \
        [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(torch.equal(before[n], p.data) for n, p in model.named_parameters() if n in before)


def test_gradient_checkpointing_gives_the_same_gradients(base_dir):
    adapted = ga.apply(_nf4_llama(base_dir), ga.LoRA(r=4, targets=("q", "v", "down"))).train()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05)
    x = text_inputs(2, 7, vocab=VOCAB)

    def grads():
        adapted.zero_grad()
        adapted(**x).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}

    plain = grads()
    adapted.gradient_checkpointing_enable()
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and all(plain[k].abs().sum() > 0 for k in plain)
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) < 1e-6


def test_adapters_save_and_load_onto_a_fresh_nf4_model(base_dir, tmp_path):
    adapted = ga.apply(_nf4_llama(base_dir), ga.LoRA(r=4, targets=("q", "v")))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1)
    adapted.save_adapters(tmp_path)
    fresh = _nf4_llama(base_dir)
    loaded = ga.load(fresh, tmp_path)
    x = text_inputs(2, 5, vocab=VOCAB)
    with torch.no_grad():
        assert max_diff(loaded(**x), adapted(**x)) == 0.0
    assert max_diff(loaded(**x), _reference(fresh, x)) > 1e-3  # the loaded adapters are really there


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_keeps_no_dense_base_weight_alive_until_backward(base_dir, monkeypatch, checkpointing):
    """Each dense weight is read right before its linear and dropped after it: backward dequantizes again. With
    gradient checkpointing too: the reads sit inside each checkpointed layer (not passed in, which would keep them)."""
    adapted = ga.apply(_nf4_llama(base_dir), ga.LoRA(r=4, targets=("q", "v"))).train()
    if checkpointing:
        adapted.gradient_checkpointing_enable()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05)
    made = []
    dense = Packed4bitLinear.weight.fget

    def spy(self):
        w = dense(self)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(Packed4bitLinear, "weight", property(spy))
    adapted(**text_inputs(2, 7, vocab=VOCAB))    # a first call builds what it builds (the checkpointed split)
    made.clear()
    loss = adapted(**text_inputs(2, 7, vocab=VOCAB)).logits.square().mean()
    gc.collect()
    assert len(made) == 2 * 7
    assert sum(r() is not None for r in made) == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.parameters() if p.requires_grad)
