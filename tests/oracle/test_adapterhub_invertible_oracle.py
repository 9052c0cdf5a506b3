"""AdapterHub ``adapters`` 1.3.0 bottleneck adapters with an invertible adapter (``seq_bn_inv``,
``double_seq_bn_inv``, ``pfeiffer+inv``, ``houlsby+inv``: a NICE coupling block on the embedding output) →
graphadapt ``Union(<bottleneck>, InvertibleAdapter)`` (oracle venv), fp32 1e-5, BERT / GPT-2 / Llama.

Every AdapterHub tensor of the adapter (bottleneck and invertible) is set non-zero random before ``save_adapter``.
AdapterHub's built-in models apply the coupling forward only (its inverse runs in AdapterHub's own LM flex heads),
so the base-model outputs compare directly.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import BnConfig, DoubleSeqBnInvConfig, SeqBnInvConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from graphadapt.errors import CheckpointError
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@torch.no_grad()
def randomize_invertible(model, name="a", seed=5) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f"invertible_adapters.{name}." in pname:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            n += 1
    return n


CASES = {
    "bert-seq_bn_inv": ("bert", SeqBnInvConfig()),
    "bert-double_seq_bn_inv-rf4": ("bert", DoubleSeqBnInvConfig(inv_adapter_reduction_factor=4)),
    "gpt2-seq_bn_inv": ("gpt2", SeqBnInvConfig(reduction_factor=4)),
    "llama-seq_bn_inv-tanh": ("llama", SeqBnInvConfig(non_linearity="tanh")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    kind, cfg = CASES[case]
    ah = BUILD[kind](seed=0)
    adapters.init(ah)
    ah.add_adapter("a", config=cfg)
    assert randomize_adapterhub(ah, "a") > 0 and randomize_invertible(ah) == 8
    ah.set_active_adapters("a")
    ah.eval()
    ah.save_adapter(str(tmp_path), "a")
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, tmp_path).eval()
    spec = adapted.spec.adapters["a"]
    assert isinstance(spec, ga.Union) and isinstance(spec.members[1], ga.InvertibleAdapter)
    x = oracle_inputs(kind)
    with torch.no_grad():
        want, got, plain = (m(**x).last_hidden_state for m in (ah, adapted, base))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2
    # the invertible member matters on its own: without it the outputs differ
    inv = next(r for r in adapted.adapter_records if r.member == "invertible")
    adapted.get_submodule(inv.target).active = False
    with torch.no_grad():
        assert (adapted(**x).last_hidden_state - want).abs().max() > 1e-3
    adapted.get_submodule(inv.target).active = True


@pytest.mark.parametrize("name", ["seq_bn_inv", "double_seq_bn_inv", "pfeiffer+inv", "houlsby+inv"])
def test_presets_equal_adapterhub_configs(name):
    def plain(u):  # a preset member (SeqBn) equals its plain translation (Bottleneck with SeqBn's values)
        return [{k: v for k, v in m.to_dict().items() if k != "preset"} for m in u.members]

    assert plain(from_adapterhub_config(name)) == plain(from_adapterhub_config(adapters.AdapterConfig.load(name).to_dict()))


def test_glow_is_refused_clearly():
    with pytest.raises(CheckpointError, match="glow"):
        from_adapterhub_config(BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=16,
                                        non_linearity="relu", inv_adapter="glow").to_dict())
