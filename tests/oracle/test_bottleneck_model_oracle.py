"""Whole-model parity of ``graphadapt.apply`` bottleneck adapters with AdapterHub ``adapters`` 1.3.0 (oracle venv).

For each case, one tiny model is built from a fixed seed. AdapterHub gets a deep copy: ``adapters.init``,
``add_adapter("a", BnConfig(**adapterhub_config_dict(spec)))`` (or the preset config class), ``set_active_adapters``.
Every AdapterHub adapter tensor — up projections, gates, norms, scalings and the model-level shared PHM parameters
included — is set to non-zero random values, then copied into graphadapt's modules with
``load_adapterhub_state_dict`` (strict). ``graphadapt.apply`` runs on the untouched original (so the capture,
recognition and insertion passes run on transformers 4.57 here). ``last_hidden_state`` is compared in eval mode,
fp32, on padded inputs whose batch and sequence differ from the capture's example; each case also asserts the
output moved away from the base model's, so a do-nothing adapter cannot pass.

Key correspondence (inspected on the real models, asserted in ``test_key_names``)::

    BERT   encoder.layer.{i}.attention.output.adapters.a.*  → adapters.a.encoder.layer.{i}.mh_adapter.*
           encoder.layer.{i}.output.adapters.a.*            → adapters.a.encoder.layer.{i}.output_adapter.*
    GPT-2  h.{i}.attention_adapters.adapters.a.*            → adapters.a.h.{i}.mh_adapter.*
           h.{i}.output_adapters.adapters.a.*               → adapters.a.h.{i}.output_adapter.*
    Llama  layers.{i}.{attention,output}_adapters.adapters.a.* → adapters.a.layers.{i}.{mh,output}_adapter.*
    T5     {encoder,decoder}.block.{j}.layer.0.adapters.a.*  → adapters.a.{stack}.block.{j}.layer.mh_adapter.*
           {encoder,decoder}.block.{j}.layer.{1|2}.adapters.a.* → adapters.a.{stack}.block.{j}.layer.output_adapter.*
    shared shared_parameters.a.<key>                         → adapters.a.shared_phm.<key>

The mapping itself is derived generically: every AdapterHub ``BottleneckLayer`` carries its global ``layer_idx``
and ``location_key`` (``mh_adapter``/``output_adapter``), every graphadapt record its ``layer`` and ``role``. Both
number T5's decoder layers after the encoder's, so ``leave_out`` means the same layers on both sides.

Pre-LN models (GPT-2, Llama, T5): AdapterHub's mixins call ``bottleneck_layer_forward(h, residual, None)`` at
the same two residual adds graphadapt adapts (after the attention output projection + dropout, after the FFN
down projection + dropout), with ``layer_norm=None``; graphadapt inserts its module with ``norm_kind=None``
there. The placements agree, so these are compared exactly like BERT. Not compared: ``residual_before_ln=
"post_add"`` at a pre-LN site, where AdapterHub raises ``UnboundLocalError`` (graphadapt's documented
deviation, covered in ``test_bottleneck_module_oracle.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import torch

import adapters
from adapters import (
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    SeqBnConfig,
)
from adapters.methods.bottleneck import BottleneckLayer

import graphadapt as ga
from graphadapt.methods.bottleneck.module import BottleneckAdapter, load_adapterhub_state_dict
from graphadapt.methods.bottleneck import adapterhub_config_dict
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

torch.set_num_threads(1)  # tiny tensors; the 2 cores are shared
ATOL = RTOL = 1e-5


# AdapterHub's DropPath needs torchvision: conftest.fake_torchvision installs a faithful stand-in.
pytestmark = pytest.mark.usefixtures("fake_torchvision")


# ----------------------------------------------------------------------------------------------------- helpers
def _adapterhub_sites(model, name: str = "a") -> dict[tuple[int, str], str]:
    """``(layer_idx, "mh"|"output")`` → state-dict prefix of AdapterHub's per-site adapter ``name``."""
    out = {}
    for mpath, mod in model.named_modules():
        if isinstance(mod, BottleneckLayer) and name in mod.adapters:
            pos = {"mh_adapter": "mh", "output_adapter": "output"}[mod.location_key]
            key = (mod.layer_idx, pos)
            assert key not in out, (key, out[key], mpath)
            out[key] = f"{mpath}.adapters.{name}."
    return out


def _copy_weights(ah_model, adapted, name: str = "a") -> dict[str, str]:
    """Load AdapterHub's adapter ``name`` into graphadapt's modules; returns graphadapt target → AdapterHub prefix."""
    ah_sd = ah_model.state_dict()
    sites = _adapterhub_sites(ah_model, name)
    records = [r for r in adapted.adapter_records if r.adapter == name]
    ours = {(r.layer, r.role): r.target for r in records}
    assert set(ours) == set(sites), (sorted(ours), sorted(sites))
    mapping = {}
    for key, target in ours.items():
        mod = adapted.get_submodule(target)
        assert isinstance(mod, BottleneckAdapter)
        load_adapterhub_state_dict(mod, ah_sd, prefix=sites[key], strict=True)
        mapping[target] = sites[key]
    shared_prefix = f"shared_parameters.{name}."
    theirs = {k[len(shared_prefix):]: v for k, v in ah_sd.items() if k.startswith(shared_prefix)}
    try:
        shared = adapted.get_submodule(f"adapters.{name}.shared_phm")
    except AttributeError:
        shared = None
    assert set(theirs) == (set(shared.keys()) if shared is not None else set()), theirs.keys()
    with torch.no_grad():
        for k, v in theirs.items():
            assert shared[k].shape == v.shape, k
            shared[k].copy_(v)
    return mapping


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}


def check_parity(spec: ga.Bottleneck, ah_config=None, kind: str = "bert", seed: int = 0):
    """Build both sides, copy weights, compare; returns (adapted, AdapterHub model, mapping)."""
    base = BUILDERS[kind](seed=seed)
    ah = copy.deepcopy(base)
    adapters.init(ah)
    if ah_config is None:
        ah_config = BnConfig(**adapterhub_config_dict(spec))
    ah.add_adapter("a", config=ah_config)
    ah.set_active_adapters("a")
    ah.eval()
    assert randomize_adapterhub(ah, "a", seed=seed + 1) > 0

    adapted = ga.apply(base, ga.Spec({"a": spec}, seed=0))
    adapted.eval()
    mapping = _copy_weights(ah, adapted, "a")

    x = oracle_inputs(kind)
    with torch.no_grad():
        expected = ah(**x).last_hidden_state
        got = adapted(**x).last_hidden_state
        plain = base(**x).last_hidden_state
    assert got.shape == expected.shape == plain.shape
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # not a do-nothing adapter: the adapted model is not the base model
    assert (got - plain).abs().max() > 1e-2
    return adapted, ah, mapping


# ----------------------------------------------------------------------------------------------------- presets
PRESETS = {
    "SeqBn": (ga.SeqBn(), SeqBnConfig()),
    "DoubleSeqBn": (ga.DoubleSeqBn(), DoubleSeqBnConfig()),
    "ParBn": (ga.ParBn(), ParBnConfig()),
    "AdapterPlus": (ga.AdapterPlus(), AdapterPlusConfig()),
    # hidden 32: the default reduction 32 gives bottleneck 1, which phm_dim 4 does not divide
    "Compacter": (ga.Compacter(reduction_factor=4), CompacterConfig(reduction_factor=4)),
    "CompacterPlusPlus": (ga.CompacterPlusPlus(reduction_factor=4), CompacterPlusPlusConfig(reduction_factor=4)),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_bert(preset):
    spec, cfg = PRESETS[preset]
    # the preset spec and AdapterHub's preset class describe the same adapter
    assert BnConfig(**adapterhub_config_dict(spec)).to_dict() == cfg.to_dict()
    adapted, _, mapping = check_parity(spec, cfg)
    roles = {r.role for r in adapted.adapter_records}
    assert roles == ({"mh", "output"} if spec.mh_adapter else {"output"})
    assert len(mapping) == 2 * len(roles)


def test_key_names():
    """The real AdapterHub key names for BERT, and where graphadapt puts the same adapter (Compacter: shared)."""
    spec = ga.Compacter(reduction_factor=4)
    adapted, ah, mapping = check_parity(spec, CompacterConfig(reduction_factor=4))
    for i in range(2):
        assert mapping[f"adapters.a.encoder.layer.{i}.mh_adapter"] == f"encoder.layer.{i}.attention.output.adapters.a."
        assert mapping[f"adapters.a.encoder.layer.{i}.output_adapter"] == f"encoder.layer.{i}.output.adapters.a."
    assert {k for k in ah.state_dict() if k.startswith("shared_parameters.")} == {"shared_parameters.a.phm_rule"}
    assert "adapters.a.shared_phm.phm_rule" in dict(adapted.named_parameters())
    # the shared rule really is shared: one tensor read by all four sites
    phm_rule = adapted.get_parameter("adapters.a.shared_phm.phm_rule")
    with torch.no_grad():
        x = oracle_inputs("bert")
        before = adapted(**x).last_hidden_state
        phm_rule.mul_(2.0)
        assert not torch.allclose(adapted(**x).last_hidden_state, before, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- option grid
def _bn(**kw) -> ga.Bottleneck:
    base = dict(mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity="relu")
    return ga.Bottleneck(**{**base, **kw})


# Each value of every option appears at least once (see test_grid_covers_every_value).
GRID = {
    "olb_T-ola_T-rbl_T": _bn(original_ln_before=True, original_ln_after=True, residual_before_ln=True),
    "olb_T-ola_T-rbl_F": _bn(original_ln_before=True, residual_before_ln=False, non_linearity="gelu"),
    "olb_T-rbl_post_add": _bn(original_ln_before=True, residual_before_ln="post_add", non_linearity="swish"),
    "olb_T-ola_F-rbl_F": _bn(original_ln_before=True, original_ln_after=False, residual_before_ln=False,
                             non_linearity="tanh"),
    "olb_F-ola_F": _bn(original_ln_before=False, original_ln_after=False, non_linearity="gelu_new"),
    "olb_F-rbl_F": _bn(original_ln_before=False, residual_before_ln=False, non_linearity="leakyrelu"),
    "ln_before": _bn(ln_before=True, original_ln_before=True, non_linearity="sigmoid"),
    "ln_after": _bn(ln_after=True, non_linearity="silu"),
    "ln_both-arbl": _bn(ln_before=True, ln_after=True, adapter_residual_before_ln=True, original_ln_before=True),
    "arbl-olb_F": _bn(adapter_residual_before_ln=True, non_linearity="gelu_python"),
    "scaling_float": _bn(scaling=2.5, original_ln_before=True),
    "scaling_learned": _bn(scaling="learned", non_linearity="quick_gelu"),
    "scaling_channel-gating": _bn(scaling="channel", use_gating=True, original_ln_before=True),
    "gating-ln_after-houlsby": _bn(use_gating=True, ln_after=True, init_weights="houlsby"),
    "mam-ln_before": _bn(init_weights="mam_adapter", ln_before=True, non_linearity="relu6"),
    "parallel": _bn(is_parallel=True, scaling=4.0, init_weights="mam_adapter"),
    "parallel-ln_after-gating-learned": _bn(is_parallel=True, ln_after=True, use_gating=True, scaling="learned",
                                            original_ln_after=False, ln_before=True),
    "mh_only-rf_dict": _bn(output_adapter=False, reduction_factor={"0": 2, "default": 8}, original_ln_before=True),
    "output_only-leave_out": _bn(mh_adapter=False, leave_out=[0], non_linearity="gelu"),
    "dropout-stochastic_depth": _bn(dropout=0.3, stochastic_depth=0.2, original_ln_before=True),
    "phm": _bn(phm_layer=True, non_linearity="gelu"),
    "phm-unshared-rank2-nobias": _bn(phm_layer=True, shared_phm_rule=False, phm_rank=2, phm_bias=False,
                                     original_ln_before=True),
    "phm-factor_rule-uniform": _bn(phm_layer=True, factorized_phm_rule=True, phm_c_init="uniform",
                                   phm_dim=2, is_parallel=True),
    "phm-shared_W-gating-channel": _bn(phm_layer=True, shared_W_phm=True, use_gating=True, scaling="channel",
                                       ln_after=True, hypercomplex_nonlinearity="normal", learn_phm=False),
    "phm-unfactorized_W-layers": _bn(phm_layer=True, factorized_phm_W=False, shared_phm_rule=False,
                                     hypercomplex_nonlinearity="glorot-normal", layers=[1], mh_adapter=False),
}


@pytest.mark.parametrize("case", list(GRID))
def test_option_grid_bert(case):
    spec = GRID[case]
    d = adapterhub_config_dict(spec, num_layers=2)
    if spec.shared_W_phm:
        # AdapterHub's init_shared_parameters computes ``in_features // reduction_factor`` and passes it as a
        # size: a float reduction (what adapterhub_config_dict emits, 4.0) raises TypeError there. Its presets
        # use ints, so give it the int.
        d["reduction_factor"] = int(d["reduction_factor"])
    cfg = BnConfig(**d)
    adapted, _, mapping = check_parity(spec, cfg, seed=list(GRID).index(case) % 3)
    layers = {r.layer for r in adapted.adapter_records}
    assert layers == ({0, 1} - set(spec.leave_out) if spec.layers is None else set(spec.layers))
    if isinstance(spec.reduction_factor, Mapping):
        sizes = {r.layer: adapted.get_submodule(r.target).bottleneck_size for r in adapted.adapter_records}
        assert sizes == {0: 16, 1: 4}


def test_grid_covers_every_value():
    wanted = {
        "original_ln_before": {True, False}, "original_ln_after": {True, False},
        "residual_before_ln": {True, False, "post_add"}, "adapter_residual_before_ln": {True, False},
        "ln_before": {True, False}, "ln_after": {True, False}, "init_weights": {"bert", "mam_adapter", "houlsby"},
        "is_parallel": {True, False}, "use_gating": {True, False}, "phm_layer": {True, False},
        "mh_adapter": {True, False}, "output_adapter": {True, False},
        "scaling": {"float", "learned", "channel"}, "shared_phm_rule": {True, False},
        "shared_W_phm": {True, False}, "factorized_phm_W": {True, False}, "factorized_phm_rule": {True, False},
        "phm_bias": {True, False}, "learn_phm": {True, False}, "phm_c_init": {"normal", "uniform"},
    }
    seen: dict[str, set] = {k: set() for k in wanted}
    for spec in GRID.values():
        for k in wanted:
            v = getattr(spec, k)
            seen[k].add("float" if k == "scaling" and isinstance(v, float) else v)
    assert seen == wanted
    assert len({s.non_linearity for s in GRID.values()}) >= 8
    assert any(s.leave_out for s in GRID.values()) and any(s.layers for s in GRID.values())
    assert any(not isinstance(s.reduction_factor, float) for s in GRID.values())


# ----------------------------------------------------------------------------------------------------- pre-LN
PRE_LN = {
    "gpt2-DoubleSeqBn-ln": ("gpt2", _bn(ln_before=True, ln_after=True, use_gating=True, scaling="channel",
                                        non_linearity="gelu_new")),
    "gpt2-SeqBn": ("gpt2", ga.SeqBn(reduction_factor=4)),
    "gpt2-ParBn": ("gpt2", ga.ParBn()),
    "gpt2-Compacter": ("gpt2", ga.Compacter(reduction_factor=4)),
    "llama-DoubleSeqBn": ("llama", ga.DoubleSeqBn(reduction_factor=4, ln_after=True)),
    "t5-Houlsby-gating": ("t5", _bn(use_gating=True, scaling="learned", leave_out=[1], non_linearity="gelu")),
}


@pytest.mark.parametrize("case", list(PRE_LN))
def test_pre_ln_models(case):
    kind, spec = PRE_LN[case]
    adapted, ah, mapping = check_parity(spec, kind=kind)
    assert {r.placement for r in adapted.adapter_records} == {"pre_ln"}
    assert all(adapted.get_submodule(t).norm_kind is None for t in mapping)
    if kind == "gpt2":
        for i in range(2):
            if spec.mh_adapter:
                assert mapping[f"adapters.a.h.{i}.mh_adapter"] == f"h.{i}.attention_adapters.adapters.a."
            assert mapping[f"adapters.a.h.{i}.output_adapter"] == f"h.{i}.output_adapters.adapters.a."
    if kind == "t5":
        # leave_out=[1] (global index) skips encoder block 1 on both sides; decoder layers are 2 and 3
        assert {r.layer for r in adapted.adapter_records} == {0, 2, 3}
        assert mapping["adapters.a.decoder.block.0.layer.output_adapter"] == "decoder.block.0.layer.2.adapters.a."
        assert mapping["adapters.a.encoder.block.0.layer.mh_adapter"] == "encoder.block.0.layer.0.adapters.a."


def test_inactive_adapter_matches_adapterhub_base():
    """Switching the adapter off on both sides gives the base model on both sides."""
    adapted, ah, _ = check_parity(ga.DoubleSeqBn(reduction_factor=4))
    x = oracle_inputs("bert")
    ah.set_active_adapters(None)
    adapted.set_active([])
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).last_hidden_state, ah(**x).last_hidden_state, atol=ATOL, rtol=RTOL)
