"""Parity of graphadapt.methods.bottleneck (module, phm) with AdapterHub ``adapters`` 1.3.0 (oracle venv).

AdapterHub side: a standalone ``BottleneckLayer`` with one adapter active as ``Stack("a")`` — exactly what a
model's sub-block calls (``pre_forward`` → ``Adapter.forward`` → ``post_forward``). Every AdapterHub tensor is
randomised (up projection, scaling, norms and gate included), copied into graphadapt with
``load_adapterhub_state_dict``, and the outputs compared in fp32 on random ``h``, ``residual`` and a random
model LayerNorm (or ``None`` = pre-LN site).
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import torch  # noqa: E402
from adapters import (  # noqa: E402
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    SeqBnConfig,
    Stack,
)
from adapters.configuration import ModelAdaptersConfig  # noqa: E402
from adapters.context import ForwardContext  # noqa: E402
from adapters.methods import modeling as ah_modeling  # noqa: E402
from adapters.methods.bottleneck import BottleneckLayer  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from graphadapt.methods.bottleneck.module import (  # noqa: E402
    ACTIVATIONS,
    BottleneckAdapter,
    adapterhub_key_map,
    kwargs_from_adapterhub_config,
    load_adapterhub_state_dict,
)
from graphadapt.methods.bottleneck.phm import PHMConfig, init_shared_phm_parameters, shared_phm_shapes  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: thread start-up dominates, and the 2 cores are shared
H = 128  # divisible by phm_dim 4 at every preset's reduction factor that uses PHM (32 → 4)
ATOL = RTOL = 1e-5
BASE = dict(mh_adapter=False, output_adapter=True)


# AdapterHub's DropPath needs torchvision: conftest.fake_torchvision installs a faithful stand-in.
pytestmark = pytest.mark.usefixtures("fake_torchvision")


def build_pair(cfg, *, norm: str | None = "layer_norm", seed: int = 0, hidden: int = H):
    """AdapterHub BottleneckLayer + graphadapt module with identical random weights; plus a forward helper."""
    torch.manual_seed(seed)
    layer = BottleneckLayer("output_adapter")
    ac = ModelAdaptersConfig()
    ac.add("a", config=cfg)
    layer.init_adapters(types.SimpleNamespace(hidden_size=hidden), ac)
    assert layer.add_adapter("a", 0)
    ac.active_setup = Stack("a")
    ah = layer.adapters["a"]

    kwargs = kwargs_from_adapterhub_config(cfg)
    bottleneck = max(1, int(hidden // kwargs["reduction_factor"]))
    shared = None
    if cfg["phm_layer"]:
        pcfg = PHMConfig(**{k: kwargs[k] for k in PHMConfig.__dataclass_fields__ if k in kwargs})
        if shared_phm_shapes(hidden, bottleneck, pcfg):
            # Built by graphadapt and handed to both (AdapterHub's own builder crashes for non-factorised shared W).
            shared = init_shared_phm_parameters(hidden, bottleneck, pcfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(ah.named_parameters()) + (list(shared.items()) if shared is not None else []):
            if "norm" in name:  # LayerNorm-like: keep weights near 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "scaling":
                p.copy_(0.5 + torch.rand(p.shape, generator=g) * 2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    if norm == "layer_norm":
        model_norm = torch.nn.LayerNorm(hidden, eps=float(torch.tensor([1e-12, 1e-5, 1e-3])[seed % 3]))
        norm_args = dict(norm_kind="layer_norm", norm_eps=model_norm.eps)
    elif norm == "rms_norm":
        model_norm = LlamaRMSNorm(hidden, eps=1e-6)
        norm_args = dict(norm_kind="rms_norm", norm_eps=1e-6)
    else:
        model_norm, norm_args = None, dict(norm_kind=None)
    if model_norm is not None:
        with torch.no_grad():
            for p in model_norm.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() and p is model_norm.weight else 0))

    ours = BottleneckAdapter(hidden, **kwargs, shared=shared, **norm_args)
    load_adapterhub_state_dict(ours, ah.state_dict())
    layer.eval()
    ours.eval()
    ln_w = getattr(model_norm, "weight", None)
    ln_b = getattr(model_norm, "bias", None)

    def run(h, r, active=True):
        ctx = ForwardContext(None)
        ctx.shared_parameters = {"a": shared} if shared is not None else {}
        ac.active_setup = Stack("a") if active else None
        with ctx:
            expected = layer(h, r, model_norm)
        ac.active_setup = Stack("a")
        return expected, ours(h, r, ln_w, ln_b)

    return layer, ours, run


def inputs(seed: int = 0, hidden: int = H):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(2, 7, hidden, generator=g), torch.randn(2, 7, hidden, generator=g) * 2


def check(cfg, norm="layer_norm", seed=0):
    layer, _, run = build_pair(cfg, norm=norm, seed=seed)
    h, r = inputs(seed)
    expected, got = run(h, r)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # Not a do-nothing pair: the adapter moved the output away from the un-adapted sub-block (AdapterHub's
    # own no-active-adapter path).
    assert not torch.allclose(expected, run(h, r, active=False)[0], atol=1e-3)
    return expected


PRESETS = {
    "SeqBn": SeqBnConfig(),
    "DoubleSeqBn": DoubleSeqBnConfig(),
    "ParBn": ParBnConfig(),
    "AdapterPlus": AdapterPlusConfig(),
    "Compacter": CompacterConfig(),
    "CompacterPlusPlus": CompacterPlusPlusConfig(),
}


@pytest.mark.parametrize("norm", ["layer_norm", None, "rms_norm"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets(preset, norm):
    check(PRESETS[preset], norm=norm)


# Structural grid: every combination below, each crossed inside the test with scaling × gating × phm_layer.
STRUCTURE = [
    s
    for s in itertools.product(
        [True, False],  # original_ln_before
        [True, False],  # original_ln_after
        [True, False, "post_add"],  # residual_before_ln
        [False, True],  # ln_before
        [False, True],  # ln_after
        [False, True],  # adapter_residual_before_ln
        [False, True],  # is_parallel
        ["layer_norm", None],  # the model norm (None: pre-LN site)
    )
    # AdapterHub leaves its residual unassigned for these (UnboundLocalError); see test_post_add_without_norm.
    if not (s[2] == "post_add" and not s[6] and (not s[0] or s[7] is None))
]
NONLIN = ["relu", "gelu", "swish", "tanh", "gelu_new", "leakyrelu"]


@pytest.mark.parametrize("structure", STRUCTURE, ids=lambda s: "-".join(map(str, s)))
def test_option_grid(structure):
    orig_before, orig_after, res_before_ln, ln_before, ln_after, adapter_res_before_ln, parallel, norm = structure
    offset = STRUCTURE.index(structure)  # rotates the activation across structures
    i = 0
    for scaling, gating, phm in itertools.product([1.0, 2.0, "learned", "channel"], [False, True], [False, True]):
        cfg = BnConfig(
            **BASE,
            reduction_factor=8,
            non_linearity=NONLIN[(offset + i) % len(NONLIN)],
            original_ln_before=orig_before,
            original_ln_after=orig_after,
            residual_before_ln=res_before_ln,
            ln_before=ln_before,
            ln_after=ln_after,
            adapter_residual_before_ln=adapter_res_before_ln,
            is_parallel=parallel,
            scaling=scaling,
            use_gating=gating,
            phm_layer=phm,
        )
        check(cfg, norm=norm, seed=i)
        i += 1


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations(name):
    check(BnConfig(**BASE, reduction_factor=4, non_linearity=name, use_gating=True, ln_after=True), seed=3)


PHM_GRID = list(itertools.product([False, True], [False, True], [False, True], [False, True], [1, 3], [True, False]))


@pytest.mark.parametrize("shared_W,factor_W,shared_rule,factor_rule,rank,bias", PHM_GRID)
def test_phm_variants(shared_W, factor_W, shared_rule, factor_rule, rank, bias):
    for parallel in (False, True):
        cfg = BnConfig(
            **BASE,
            reduction_factor=4,
            non_linearity="gelu",
            phm_layer=True,
            shared_W_phm=shared_W,
            factorized_phm_W=factor_W,
            shared_phm_rule=shared_rule,
            factorized_phm_rule=factor_rule,
            phm_rank=rank,
            phm_bias=bias,
            is_parallel=parallel,
            phm_dim=8,
        )
        check(cfg, seed=rank)


@pytest.mark.parametrize("factor_W,factor_rule", [(True, False), (True, True)])
def test_shared_phm_keys_match_adapterhub(factor_W, factor_rule):
    # AdapterHub's own shared-parameter builder (where it works: factorised W) yields our keys and shapes.
    cfg = BnConfig(**BASE, reduction_factor=4, non_linearity="relu", phm_layer=True, shared_W_phm=True,
                   factorized_phm_W=factor_W, factorized_phm_rule=factor_rule)  # fmt: skip
    theirs = ah_modeling.init_shared_parameters(cfg, H, "cpu")
    pcfg = PHMConfig(shared_W_phm=True, factorized_phm_W=factor_W, factorized_phm_rule=factor_rule)
    ours = init_shared_phm_parameters(H, H // 4, pcfg)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(ours[k].requires_grad == theirs[k].requires_grad for k in ours)


def test_post_add_without_norm():
    # AdapterHub: UnboundLocalError. graphadapt: the residual "after the add" is h + r (no norm to apply).
    cfg = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", residual_before_ln="post_add",
                   original_ln_before=True)  # fmt: skip
    layer, ours, _ = build_pair(cfg, norm=None)
    h, r = inputs()
    with pytest.raises(UnboundLocalError):
        layer(h, r, None)
    ref = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", residual_before_ln=False, original_ln_before=True)
    ref_layer, _, _ = build_pair(ref, norm=None)
    ref_layer.load_state_dict(layer.state_dict())
    torch.testing.assert_close(ours(h, r), ref_layer(h, r, None), atol=ATOL, rtol=RTOL)


def test_stochastic_depth_training_matches():
    # AdapterPlus in train mode (dropout 0, stochastic_depth 0.1): same global-RNG draw on both sides.
    layer, ours, _ = build_pair(AdapterPlusConfig(stochastic_depth=0.5))
    layer.train()
    ours.train()
    ln = torch.nn.LayerNorm(H)
    for s in range(4):
        h, r = inputs(s)
        torch.manual_seed(s)
        expected = layer(h, r, ln)
        torch.manual_seed(s)
        got = ours(h, r, ln.weight, ln.bias)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_key_map_covers_adapterhub_state_dict():
    for ln_before, phm, gating, scaling, ln_after in itertools.product([False, True], repeat=5):
        cfg = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", ln_before=ln_before, phm_layer=phm,
                       shared_phm_rule=False, use_gating=gating, scaling="channel" if scaling else 1.0,
                       ln_after=ln_after)  # fmt: skip
        layer, ours, _ = build_pair(cfg)
        theirs = layer.adapters["a"].state_dict()
        key_map = adapterhub_key_map(ours)
        assert set(key_map) == set(theirs)
        assert {v for v in key_map.values() if v is not None} == set(ours.state_dict())


INIT_GRID = list(itertools.product(["bert", "mam_adapter", "houlsby"], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("init,ln_before,gating,parallel", INIT_GRID)
def test_init_zero_pattern_matches_adapterhub(init, ln_before, gating, parallel):
    # Init is RNG-independent in *which* tensors are zero / one; AdapterHub and graphadapt must agree.
    cfg = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", init_weights=init, ln_before=ln_before,
                   use_gating=gating, is_parallel=parallel, ln_after=True, scaling="learned")  # fmt: skip
    layer = BottleneckLayer("output_adapter")
    ac = ModelAdaptersConfig()
    ac.add("a", config=cfg)
    layer.init_adapters(types.SimpleNamespace(hidden_size=H), ac)
    layer.add_adapter("a", 0)
    theirs = layer.adapters["a"].state_dict()
    ours = BottleneckAdapter(H, **kwargs_from_adapterhub_config(cfg)).state_dict()
    for src, dst in adapterhub_key_map(BottleneckAdapter(H, **kwargs_from_adapterhub_config(cfg))).items():
        if dst is None:
            continue
        t, o = theirs[src], ours[dst]
        assert t.shape == o.shape, src
        assert bool((t == 0).all()) == bool((o == 0).all()), src
        assert bool((t == 1).all()) == bool((o == 1).all()), src
        # Same distribution scale (std within a generous factor) where both are random.
        if t.numel() > 16 and t.std() > 0:
            assert 0.5 < float(o.std() / t.std()) < 2.0, src


def test_adapterhub_phm_init_bugs_documented():
    # PHM + mam_adapter / houlsby crash in AdapterHub; graphadapt builds them (see PHMLinear.reset_parameters).
    for init in ("mam_adapter", "houlsby"):
        cfg = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", phm_layer=True, shared_phm_rule=False,
                       init_weights=init)  # fmt: skip
        with pytest.raises(AttributeError):
            build_pair(cfg)
        BottleneckAdapter(H, **kwargs_from_adapterhub_config(cfg))
    # hypercomplex_nonlinearity is ignored by AdapterHub (always xavier_normal): "normal" with tiny range is not tiny.
    cfg = BnConfig(**BASE, reduction_factor=8, non_linearity="relu", phm_layer=True, shared_phm_rule=False,
                   hypercomplex_nonlinearity="normal", phm_init_range=1e-6, factorized_phm_W=False)  # fmt: skip
    layer = BottleneckLayer("output_adapter")
    ac = ModelAdaptersConfig()
    ac.add("a", config=cfg)
    layer.init_adapters(types.SimpleNamespace(hidden_size=H), ac)
    layer.add_adapter("a", 0)
    assert layer.adapters["a"].adapter_up.W.std() > 1e-3
    assert BottleneckAdapter(H, **kwargs_from_adapterhub_config(cfg)).adapter_up.W.std() < 1e-5
