"""Prefix tuning against AdapterHub ``adapters`` 1.3.0 (oracle venv): through ``import_adapterhub`` (AdapterHub
``save_adapter`` → graphadapt) and by copying weights into ``graphadapt.apply``'s modules. Every AdapterHub tensor
is set non-zero random; outputs compared in eval mode on padded inputs at fp32 1e-5, and must differ from the base
model's.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import PrefixTuningConfig

import graphadapt as ga
from graphadapt.methods.prefix import PrefixTuning, eject_prefix
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def _ah(kind, cfg, name="a"):
    # AdapterHub 1.3 + transformers 4.57 SDPA GPT-2/Llama: the boolean causal mask is "inverted" for the prefix
    # (prefix_mask = ~ones), so the prefix is masked out and has no effect; its eager path (additive masks) is
    # right, and equals graphadapt on the default (SDPA) capture of the same weights.
    m = BUILD[kind](seed=0, **({} if kind == "bert" else {"attn_implementation": "eager"}))
    adapters.init(m)
    m.add_adapter(name, config=cfg)
    randomize_adapterhub(m, name, seed=1)  # bottleneck/LoRA members of unions
    n = 0
    with torch.no_grad():  # prefix tensors live outside `.adapters.<name>.`
        g = torch.Generator().manual_seed(2)
        for pname, p in m.named_parameters():
            if f"prefix_tunings.{name}." in pname or f"prefix_gates.{name}." in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0
    m.set_active_adapters(name)
    return m.eval()


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


CASES = {
    "bert-reparam": ("bert", dict(prefix_length=4, bottleneck_size=16)),
    "bert-flat": ("bert", dict(prefix_length=5, flat=True)),
    "bert-gated": ("bert", dict(prefix_length=3, bottleneck_size=8, use_gating=True)),
    "bert-gated-unshared-leave-out": ("bert", dict(prefix_length=3, flat=True, use_gating=True, shared_gating=False,
                                                   leave_out=[1])),
    "gpt2-reparam-gated": ("gpt2", dict(prefix_length=4, bottleneck_size=16, use_gating=True)),
    "llama-flat-gqa": ("llama", dict(prefix_length=4, flat=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefix_import_matches_adapterhub(case, tmp_path):
    kind, kw = CASES[case]
    ah = _ah(kind, PrefixTuningConfig(**kw))
    ah.save_adapter(str(tmp_path), "a")
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, tmp_path).eval()
    assert adapted.spec.adapters["a"] == PrefixTuning(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in kw.items()})
    x = oracle_inputs(kind)
    want, got = _out(ah, x), _out(adapted, x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - _out(base, x)).abs().max() > 1e-2
    if not kw.get("flat"):
        assert eject_prefix(adapted, "a") == 1
        torch.testing.assert_close(_out(adapted, x), got, atol=1e-6, rtol=1e-6)


def test_prefix_weight_copy_matches_adapterhub():
    """No importer: apply the spec, copy AdapterHub's tensors by hand (names mirror AdapterHub's)."""
    kw = dict(prefix_length=4, bottleneck_size=12, use_gating=True)
    ah = _ah("bert", PrefixTuningConfig(**kw))
    adapted = ga.apply(tiny_bert(seed=0), ga.Spec({"a": PrefixTuning(**kw)})).eval()
    ours = dict(adapted.named_parameters())
    with torch.no_grad():
        for k, v in ah.named_parameters():
            if "prefix_tunings.a." in k:
                ours["adapters.a.prefix.generators." + k.split("prefix_tunings.a.")[1]].copy_(v)
            elif "prefix_gates.a." in k:
                layer = k.split("encoder.layer.")[1].split(".")[0]
                ours[f"adapters.a.encoder.layer.{layer}.self_prefix.gate.{k.rsplit('.', 1)[1]}"].copy_(v)
    x = oracle_inputs("bert")
    torch.testing.assert_close(_out(adapted, x), _out(ah, x), atol=ATOL, rtol=RTOL)


def test_prefix_checkpoint_for_another_architecture_is_refused(tmp_path):
    _ah("gpt2", PrefixTuningConfig(prefix_length=4, flat=True)).save_adapter(str(tmp_path), "a")
    with pytest.raises(ga.CheckpointError, match="does not fit|not filled|unused"):
        ga.import_adapterhub(tiny_llama(seed=0), tmp_path)  # kv heads 2, not GPT-2's 4
