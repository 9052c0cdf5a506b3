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
    # AdapterHub's SDPA GPT-2/Llama masks its prefixes out (tests/oracle/test_prefix_oracle.py): its eager path is right
    ah = BUILD[kind](seed=0, **({} if kind == "bert" else {"attn_implementation": "eager"}))
    adapters.init(ah)
    readers = {}
    for i, n in enumerate(names):
        ah.add_adapter(n, config=cfg[i] if isinstance(cfg, (list, tuple)) else cfg)
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


PREFIXES = [PrefixTuningConfig(prefix_length=3, flat=True), PrefixTuningConfig(prefix_length=5, flat=True)]
EQUAL = [PrefixTuningConfig(prefix_length=4, flat=True), PrefixTuningConfig(prefix_length=4, flat=True)]
PREFIX_BLOCKS = {  # BatchSplit/Parallel with prefixes of one length: see test_rows_of_shorter_prefixes_are_masked
    "bert-stack": ("bert", PREFIXES, lambda m: m.Stack("a", "b")),
    "bert-batch-split": ("bert", EQUAL, lambda m: m.BatchSplit("a", "b", batch_sizes=[1, 2])),
    "bert-parallel": ("bert", EQUAL, lambda m: m.Parallel("a", "b")),
    "gpt2-stack": ("gpt2", PREFIXES, lambda m: m.Stack("b", "a")),
    "gpt2-batch-split": ("gpt2", EQUAL, lambda m: m.BatchSplit("a", "b", batch_sizes=[2, 1])),
}


@pytest.mark.parametrize("case", list(PREFIX_BLOCKS))
def test_prefix_composition_matches_adapterhub(case, tmp_path):
    """Prefix-tuning adapters composed at the attention cores, as AdapterHub composes them."""
    import adapters.composition as ac

    kind, cfgs, block = PREFIX_BLOCKS[case]
    ah, adapted = _pair(kind, cfgs, tmp_path)
    ah.set_active_adapters(block(ac))
    adapted.set_active(block(ga))
    x = oracle_inputs(kind)
    with torch.no_grad():
        want, got = ah(**x).last_hidden_state, adapted(**x).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for single in ("a", "b"):  # the composition is neither prefix alone (on every row / copy)
        adapted.set_active(single)
        alone = _out(adapted, kind)
        assert (alone.repeat(got.shape[0] // alone.shape[0], 1, 1) - got).abs().max() > 1e-3


def test_prefix_average_is_refused_as_adapterhub_defines_none(tmp_path):
    _, adapted = _pair("bert", PREFIXES, tmp_path)
    with pytest.raises(SpecError, match="Average is not defined over prefixes"):
        adapted.set_active(ga.Average("a", "b"))
    assert adapted.active_adapters() == ["a"]  # refused: the model is as it was


def test_rows_of_shorter_prefixes_are_masked(tmp_path):
    """BatchSplit over prefixes of different lengths: the shorter prefix's rows are padded at the front. graphadapt
    masks the padding, so each row equals its own prefix alone. AdapterHub pads its additive mask with 1.0 (its
    0/1-mask convention), so the zero keys it pads with are attended there: its rows differ from each prefix alone."""
    import adapters.composition as ac

    ah, adapted = _pair("bert", PREFIXES, tmp_path)
    x = oracle_inputs("bert")
    adapted.set_active(ga.BatchSplit("a", "b", batch_sizes=[1, 2]))
    got = _out(adapted, "bert")
    for single, rows in (("a", slice(0, 1)), ("b", slice(1, 3))):
        adapted.set_active(single)
        torch.testing.assert_close(got[rows], _out(adapted, "bert")[rows], atol=ATOL, rtol=RTOL)
    ah.set_active_adapters(ac.BatchSplit("a", "b", batch_sizes=[1, 2]))
    hub = _out(ah, "bert")
    torch.testing.assert_close(got[1:], hub[1:], atol=ATOL, rtol=RTOL)  # the longest prefix's rows agree
    assert (got[:1] - hub[:1]).abs().max() > 1e-3  # the padded rows are where AdapterHub attends its padding
