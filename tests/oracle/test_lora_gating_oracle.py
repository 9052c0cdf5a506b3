"""LoRAModule (plain and gated) against AdapterHub ``adapters`` on real BERT / GPT-2 layers.

Run in the oracle venv (transformers 4.57 + adapters 1.3):
    /work/venvs/oracle/bin/python -m pytest tests/oracle/test_lora_gating_oracle.py -q -p no:cacheprovider
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import torch  # noqa: E402

adapters = pytest.importorskip("adapters")
from adapters import LoRAConfig  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402

from graphadapt.methods.lora import LoRAModule  # noqa: E402

R, ALPHA = 4, 16  # scaling 4: a gate that forgot to replace it would be caught


def _perturb(lora):
    """Non-trivial weights: B != 0 and a gate whose value differs clearly between examples."""
    with torch.no_grad():
        lora.lora_A.normal_(0, 0.3)
        lora.lora_B.normal_(0, 0.3)
        if lora.use_gating:
            lora.gate.weight.normal_(0, 0.5)
            lora.gate.bias.normal_(0, 0.5)


def _run_with_capture(model, module, inputs):
    cap = {}
    handle = module.register_forward_hook(lambda m, i, o: cap.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    return cap["x"], cap["y"]


def _ours(in_f, out_f, A, B, gate_w=None, gate_b=None, **kw):
    m = LoRAModule(in_f, out_f, r=R, alpha=ALPHA, use_gating=gate_w is not None, **kw).eval()
    with torch.no_grad():
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        if gate_w is not None:
            m.gate.weight.copy_(gate_w)
            m.gate.bias.copy_(gate_b)
    return m


@pytest.mark.parametrize("use_gating", [True, False])
def test_bert_query_matches_adapterhub(use_gating):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    model = BertModel(cfg)
    adapters.init(model)
    model.add_adapter("g", LoRAConfig(r=R, alpha=ALPHA, use_gating=use_gating, attn_matrices=["q", "v"]))
    model.set_active_adapters("g")
    model.eval()
    q = model.encoder.layer[0].attention.self.query
    lora = q.loras["g"]
    _perturb(lora)
    x, y_ref = _run_with_capture(model, q, torch.randint(0, 100, (3, 7)))

    W, b = q.weight.detach(), q.bias.detach()
    y0 = torch.nn.functional.linear(x, W, b)
    gate = (lora.gate.weight, lora.gate.bias) if use_gating else (None, None)
    m = _ours(32, 32, lora.lora_A, lora.lora_B, *gate)
    out = m(x, y0, W, b)
    assert not torch.allclose(out, y0, atol=1e-3)
    torch.testing.assert_close(out, y_ref, atol=1e-6, rtol=1e-5)
    if use_gating:
        g = m.gate_value(x)
        assert g.shape == (3, 1, 1) and g.unique().numel() == 3


@pytest.mark.parametrize("use_gating", [True, False])
def test_gpt2_fused_c_attn_matches_adapterhub(use_gating):
    """AdapterHub's LoRAMergedLinear on GPT-2's fused Conv1D c_attn with q and v: one
    stacked A/B (grouped) and a 2-head gate == two sliced LoRAModules chained, q on
    [0, h) with gate head 0, v on [2h, 3h) with gate head 1; k untouched."""
    torch.manual_seed(1)
    h = 32
    model = GPT2Model(GPT2Config(n_embd=h, n_layer=1, n_head=4, vocab_size=100, n_positions=16))
    adapters.init(model)
    model.add_adapter("g", LoRAConfig(r=R, alpha=ALPHA, use_gating=use_gating, attn_matrices=["q", "v"]))
    model.set_active_adapters("g")
    model.eval()
    ca = model.h[0].attn.c_attn
    assert ca.fan_in_fan_out and ca.weight.shape == (h, 3 * h)
    lora = ca.loras["g"]
    _perturb(lora)
    x, y_ref = _run_with_capture(model, ca, torch.randint(0, 100, (2, 9)))

    W, b = ca.weight.detach(), ca.bias.detach()
    y0 = x @ W + b
    common = dict(fan_in_fan_out=True, total_out=3 * h)

    def gate(i):
        return (lora.gate.weight[i : i + 1], lora.gate.bias[i : i + 1]) if use_gating else (None, None)

    mq = _ours(h, h, lora.lora_A[:R], lora.lora_B[:h], *gate(0), out_slice=(0, h), **common)
    mv = _ours(h, h, lora.lora_A[R:], lora.lora_B[h:], *gate(1), out_slice=(2 * h, 3 * h), **common)
    out = mv(x, mq(x, y0, W, b), W, b)
    assert torch.equal(out[..., h : 2 * h], y0[..., h : 2 * h])
    assert not torch.allclose(out, y0, atol=1e-3)
    torch.testing.assert_close(out, y_ref, atol=1e-6, rtol=1e-5)
    if not use_gating:
        # fold of both slices == AdapterHub's own merge
        W_f, b_f = mv.fold(*mq.fold(W, b))
        model.merge_adapter("g")
        torch.testing.assert_close(W_f, ca.weight.detach(), atol=1e-6, rtol=1e-5)
