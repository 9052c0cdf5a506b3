"""graphadapt on a CUDA device: apply, train, merge, half precision, generate and export.

Skipped where no GPU is present (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``. Every test compares against the same model on
the CPU or against Hugging Face on the GPU, with non-zero adapter weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphadapt as ga  # noqa: E402
from helpers import max_diff, output_tensors, perturb_adapters, randomize_lora, text_inputs, tiny_bert, tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _spec():
    return ga.Spec({"lora": ga.LoRA(r=4, targets=("q", "v")), "bn": ga.SeqBn(reduction_factor=4)})


def _randomize_all(adapted):
    """Non-zero values for every adapter parameter (LoRA B and bottleneck up start at zero)."""
    perturb_adapters(adapted, seed=3, std=0.2, replace=True)


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()}


def test_apply_on_cuda_matches_cpu_and_stays_on_the_device():
    cpu = tiny_bert()
    gpu = tiny_bert().to(CUDA)
    a_cpu, a_gpu = ga.apply(cpu, _spec()), ga.apply(gpu, _spec())
    assert {p.device.type for p in a_gpu.parameters()} == {"cuda"}, "adapters must be created on the model's device"
    x = text_inputs(2, 7, pad=2)
    with torch.no_grad():
        _randomize_all(a_cpu)
        _randomize_all(a_gpu)
        want, got = a_cpu(**x), a_gpu(**_to(x, CUDA))
        assert max_diff(cpu(**x), want) > 1e-3, "adapters must change the output"
    assert max(float((w - g.cpu()).abs().max()) for w, g in zip(output_tensors(want), output_tensors(got))) < 1e-5


def test_train_merge_unmerge_on_cuda():
    model = tiny_bert().to(CUDA)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = ga.apply(model, _spec())
    adapted.train()
    opt = torch.optim.AdamW(adapted.parameters(), lr=1e-2)
    x = _to(text_inputs(4, 9, pad=3), CUDA)
    losses = []
    for _ in range(5):
        loss = (adapted(**x).last_hidden_state[..., :4] - 1).pow(2).mean()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("adapters."))
    adapted.eval()
    with torch.no_grad():
        before = adapted(**x)
        ga.merge(adapted, strict=False)   # LoRA folds; the bottleneck stays in the graph
        assert max_diff(before, adapted(**x)) < 1e-5
        adapted.unmerge()
        assert max_diff(before, adapted(**x)) < 1e-6
    for n, p in model.named_parameters():
        assert torch.equal(p, base_weights[n]), f"{n}: the caller's weights changed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_on_cuda(dtype):
    ref = tiny_bert().to(CUDA)
    model = tiny_bert().to(CUDA, dtype)
    a_ref, adapted = ga.apply(ref, _spec()), ga.apply(model, _spec())
    assert {p.dtype for p in adapted.parameters()} == {dtype}
    _randomize_all(a_ref)
    _randomize_all(adapted)
    x = _to(text_inputs(2, 8, pad=2), CUDA)
    with torch.no_grad():
        want, got = a_ref(**x).last_hidden_state, adapted(**x).last_hidden_state
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert float((got.float() - want).abs().max()) < tol * float(want.abs().max())


def test_greedy_generate_on_cuda_equals_hf():
    model = tiny_llama(causal_lm=True).to(CUDA)
    adapted = ga.apply(model, ga.LoRA(r=4, targets=("q", "v")), cache=True)
    randomize_lora(adapted, seed=1, std=0.3)
    base = adapted.to_base_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0     # left padding
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    want = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert not torch.equal(want, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                                do_sample=False)), "LoRA must change the tokens"
    got = adapted.generate(ids, mask, max_new_tokens=10)
    assert got.device.type == "cuda" and torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_onnx_from_a_cuda_model(tmp_path, dtype):
    """Verified on onnxruntime's CUDA EP when onnxruntime-gpu is installed (fp32: TF32 must be off)."""
    ort = pytest.importorskip("onnxruntime")
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    model = tiny_bert().to(CUDA)
    adapted = ga.apply(model, _spec())
    _randomize_all(adapted)
    report = ga.export_onnx(adapted, tmp_path / "m.onnx", merge=False, dtype=dtype,
                            providers=["CUDAExecutionProvider"] if cuda_ep else None)
    assert report.verified, report
    if dtype == "fp32":
        assert max(report.max_abs_diff.values()) < 1e-4, report
    assert report.providers[0] == ("CUDAExecutionProvider" if cuda_ep else "CPUExecutionProvider")
    assert next(adapted.parameters()).device.type == "cuda", "export must leave the model on its device"
