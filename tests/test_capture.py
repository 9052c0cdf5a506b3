"""Capture: same outputs as eager on new shapes, portability across dtypes, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import graphadapt as ga
from graphadapt.capture import synthesize_inputs

from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "vit": tiny_vit}


def _fresh_inputs(name, batch=3, seq=13, dec=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    kw = {"input_ids": torch.randint(0, 100, (batch, seq), generator=g),
          "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    kw["attention_mask"][0, -3:] = 0  # padding exercises the mask path
    if name == "t5":
        kw["decoder_input_ids"] = torch.randint(0, 100, (batch, dec), generator=g)
    return kw


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_captured_equals_eager_on_new_shapes(name):
    model = BUILDERS[name]()
    gm = ga.capture(model)
    ex = gm.example_inputs()
    fresh = _fresh_inputs(name)
    for k, v in fresh.items():  # different batch and sequence than the capture used
        assert v.shape != ex[k].shape
    with torch.no_grad():
        extra = {"use_cache": False} if "use_cache" in gm.constant_inputs else {}
        ref, got = model(**fresh, **extra), gm(**fresh)
    assert type(got) is type(ref) and set(got.keys()) == set(ref.keys())
    for key in ref.keys():
        r, g = ref[key], got[key]
        if isinstance(r, torch.Tensor):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moves_across_dtypes(name, dtype):
    model = BUILDERS[name]()
    gm = copy.deepcopy(ga.capture(model)).to(dtype)
    ref_model = copy.deepcopy(model).to(dtype)
    fresh = _fresh_inputs(name)
    with torch.no_grad():
        out, ref = _first(gm(**fresh)), _first(ref_model(**fresh))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # HF upcasts RMSNorm to fp32 internally; the re-targeted graph computes in the module dtype
    tol = 1e-6 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0.05 if dtype == torch.bfloat16 else 0)


def test_shares_storage_but_not_parameter_objects():
    model = tiny_bert()
    gm = ga.capture(model)
    mp = dict(model.named_parameters())
    for n, p in gm.named_parameters():
        assert p is not mp[n] and p.data_ptr() == mp[n].data_ptr()
    for p in gm.parameters():
        p.requires_grad_(False)
    assert all(p.requires_grad for p in model.parameters())


def test_train_eval_flip_captured_dropout():
    model = tiny_bert(hidden_dropout_prob=0.5)
    gm = ga.capture(model)
    kw = _fresh_inputs("bert")
    gm.train()
    a, b = gm(**kw).last_hidden_state, gm(**kw).last_hidden_state
    assert not torch.allclose(a, b)
    gm.eval()
    torch.testing.assert_close(gm(**kw).last_hidden_state, model(**kw).last_hidden_state, atol=1e-6, rtol=0)


def test_synthesized_inputs_cover_model_kinds():
    assert set(synthesize_inputs(tiny_t5())) >= {"input_ids", "attention_mask", "decoder_input_ids"}
    assert synthesize_inputs(tiny_gpt2())["use_cache"] is False
    assert set(synthesize_inputs(tiny_vit())) == {"pixel_values"}
    before = torch.get_rng_state()
    synthesize_inputs(tiny_bert())
    assert torch.equal(before, torch.get_rng_state())


def test_positional_and_kwargs_errors():
    model = tiny_bert()
    gm = ga.capture(model)
    kw = _fresh_inputs("bert")
    torch.testing.assert_close(gm(kw["input_ids"], kw["attention_mask"]).last_hidden_state,
                               gm(**kw).last_hidden_state)
    with pytest.raises(TypeError, match="token_type_ids"):
        gm(**kw, token_type_ids=torch.zeros_like(kw["input_ids"]))
    with pytest.raises(TypeError, match="missing"):
        gm(input_ids=kw["input_ids"])


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.branchy = _Branchy()

    def forward(self, x):
        return self.branchy(self.proj(x))


class _Branchy(torch.nn.Module):
    def forward(self, h):
        if h.sum() > 0:  # data-dependent control flow: torch.export cannot capture this
            return h * 2
        return h - 1


def test_capture_error_is_clear():
    with pytest.raises(ga.CaptureError) as ei:
        ga.capture(_DataDependent(), example_inputs=(torch.randn(2, 8),))
    msg = str(ei.value)
    assert "branchy" in msg and "_Branchy" in msg          # names the module
    assert "data-dependent" in msg and "torch.cond" in msg  # says what to try
    assert len(msg.splitlines()) < 8                        # not a 200-line trace


def test_capture_rejects_non_modules_and_missing_config():
    with pytest.raises(ga.CaptureError, match="nn.Module"):
        ga.capture(lambda x: x)
    with pytest.raises(ga.CaptureError, match="example_inputs"):
        ga.capture(torch.nn.Linear(4, 4))


def test_low_precision_keeps_rotary_in_fp32():
    """HF computes rotary angles in fp32 whatever the model dtype (positions up to 1e4+ do not fit
    bf16's 8-bit mantissa): casts of integer positions and of the inv_freq buffer must stay fp32."""
    gm = copy.deepcopy(ga.capture(tiny_llama())).to(torch.bfloat16)
    islands = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.to.dtype, torch.ops.aten.to.device):
            src = n.args[0]
            val = src.meta.get("val")
            from_int = val is not None and not val.is_floating_point()
            from_buffer = src.op == "get_attr"
            to_float = any(isinstance(a, torch.dtype) and a.is_floating_point for a in n.args)
            if to_float and (from_int or from_buffer):
                islands.append(n)
                assert torch.float32 in n.args, (n.name, n.args)
    assert len(islands) >= 2  # the position cast and the inv_freq cast
    # and the cast of cos/sin back to the model dtype does follow the move
    follows = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.to.dtype
               and "rotary" in str(list((n.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0])
               and n not in islands]
    assert follows and all(torch.bfloat16 in n.args for n in follows)
