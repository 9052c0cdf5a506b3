"""AdapterHub's ``average_adapter`` and composition blocks against graphadapt (oracle venv, adapters 1.3.0).

Adapters ``a`` and ``b`` get non-zero random tensors in AdapterHub and are saved with ``save_adapter``; graphadapt
reads both into one model (``read_adapterhub_adapter``). Then the same operation runs on both sides (AdapterHub's
``average_adapter`` / ``set_active_adapters``, graphadapt's ``AdaptedModel.average_adapter`` / ``set_active``) and
the outputs must agree (1e-5, eval) and differ from each single adapter's.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import LoRAConfig, PrefixTuningConfig, SeqBnConfig

import graphadapt as ga
from graphadapt.checkpoints.adapterhub import read_adapterhub_adapter
from graphadapt.errors import SpecError
from adapterhub_helpers import oracle_inputs
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@torch.no_grad()
def _randomize(model, name: str, seed: int) -> int:
    """Non-zero random values in every tensor of AdapterHub adapter ``name`` (bottleneck, LoRA, prefix)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if not any(f"{kind}.{name}." in f".{pname}" for kind in (".adapters", ".loras", ".prefix_tunings")):
            continue
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in pname and pname.endswith("weight")
                else 0.3 * torch.randn(p.shape, generator=g))
        n += 1
    return n


def _pair(kind, cfg, tmp_path, names=("a", "b")):
    """AdapterHub model with adapters ``names`` (seeded non-zero) and graphadapt's import of the same adapters."""
    ah = BUILD[kind](seed=0)
    adapters.init(ah)
    readers = {}
    for i, n in enumerate(names):
        ah.add_adapter(n, config=cfg)
        assert _randomize(ah, n, seed=11 + i) > 0
        ah.save_adapter(str(tmp_path / n), n)
        readers[n] = read_adapterhub_adapter(tmp_path / n)
    ah.eval()
    adapted = ga.apply(BUILD[kind](seed=0), ga.Spec({n: r[0] for n, r in readers.items()}, active=names[0]))
    for n, (_, _, fill) in readers.items():
        fill(adapted, n)
    adapted.eval()
    return ah, adapted


def _out(model, kind):
    with torch.no_grad():
        return model(**oracle_inputs(kind)).last_hidden_state


LORA = LoRAConfig(r=4, alpha=8, selfattn_lora=True, output_lora=True)
AVERAGE = {
    "bert-lora-linear": ("bert", LORA, "linear", [0.7, 0.5], None),
    "bert-lora-negate-b": ("bert", LORA, "lora_linear_only_negate_b", [1.0, -0.4], None),
    "bert-lora-svd": ("bert", LORA, "lora_delta_w_svd", [0.6, 0.4], 3),
    "bert-seq-bn-linear": ("bert", SeqBnConfig(reduction_factor=4), "linear", [2.0, 1.0], None),
    "bert-prefix-linear": ("bert", PrefixTuningConfig(prefix_length=3, flat=True), "linear", None, None),
    "gpt2-lora-negate-b": ("gpt2", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], output_lora=True), "lora_linear_only_negate_b", [0.8, -0.5], None),
    "llama-lora-svd": ("llama", LoRAConfig(r=4, alpha=8), "lora_delta_w_svd", [0.5, 0.5], 2),
}


@pytest.mark.parametrize("case", list(AVERAGE))
def test_average_adapter_matches_adapterhub(case, tmp_path):
    kind, cfg, strategy, weights, rank = AVERAGE[case]
    ah, adapted = _pair(kind, cfg, tmp_path)
    ah.average_adapter("avg", ["a", "b"], weights=weights, combine_strategy=strategy, svd_rank=rank)
    ah.set_active_adapters("avg")
    adapted.average_adapter("avg", ["a", "b"], weights=weights, combine_strategy=strategy, svd_rank=rank,
                            set_active=True)
    assert adapted.active_adapters() == ["avg"]
    got = _out(adapted, kind)
    torch.testing.assert_close(got, _out(ah, kind), atol=ATOL, rtol=RTOL)
    for single in ("a", "b"):  # the average is neither input
        adapted.set_active(single)
        assert (_out(adapted, kind) - got).abs().max() > 1e-3
    if rank is not None:
        assert adapted.spec.adapters["avg"].to_dict()["r"] == rank


def test_average_refusals(tmp_path):
    ah, adapted = _pair("gpt2", AVERAGE["gpt2-lora-negate-b"][1], tmp_path)
    with pytest.raises(ValueError):  # AdapterHub refuses SVD on GPT-2's transposed Conv1D weights ...
        ah.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=2)
    with pytest.raises(SpecError, match="transposed"):  # ... and so does graphadapt, saying why
        adapted.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=2)
    assert "avg" not in adapted.spec.adapters  # the refused average left the model as it was
    with pytest.raises(SpecError, match="svd_rank"):
        adapted.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd")
    with pytest.raises(SpecError, match="unknown adapter"):
        adapted.average_adapter("avg", ["a", "c"])
    with pytest.raises(SpecError, match="combine_strategy 'svd'"):
        adapted.average_adapter("avg", ["a", "b"], combine_strategy="svd")
    with pytest.raises(SpecError, match="2 weights for 1 adapters"):
        adapted.average_adapter("avg", ["a"], weights=[1, 2])


SPLIT = {
    "bert-split": ("bert", SeqBnConfig(reduction_factor=4), [2, 4]),
    "gpt2-split": ("gpt2", SeqBnConfig(reduction_factor=4, original_ln_before=True), [4, 2]),
}


@pytest.mark.parametrize("case", list(SPLIT))
def test_split_matches_adapterhub(case, tmp_path):
    """``Split(a, b, splits=[m, n])``: sequence positions ``[0, m)`` through ``a``, ``[m, m+n)`` through ``b``."""
    from adapters.composition import Split as AHSplit

    kind, cfg, splits = SPLIT[case]
    ah, adapted = _pair(kind, cfg, tmp_path)
    ah.set_active_adapters(AHSplit("a", "b", splits=splits))
    adapted.set_active(ga.Split("a", "b", splits=splits))
    got = _out(adapted, kind)
    torch.testing.assert_close(got, _out(ah, kind), atol=ATOL, rtol=RTOL)
    m = splits[0]
    for single, part in (("a", slice(m, None)), ("b", slice(0, m))):  # each adapter acts on its own positions only
        adapted.set_active(single)
        alone = _out(adapted, kind)
        assert (alone[:, part] - got[:, part]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"Split splits \[.*\] sum to 6, but the sequence has 5 positions"):
        adapted.set_active(ga.Split("a", "b", splits=splits))
        x = oracle_inputs(kind)
        adapted(**{k: (v[:, :5] if torch.is_tensor(v) else v) for k, v in x.items()})
