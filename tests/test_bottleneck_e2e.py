"""Bottleneck adapters end to end through ``graphadapt.apply`` on tiny BERT / GPT-2 / Llama / T5 / ViT (transformers 5).

Identity at init for the zero-init scheme, the option grid (ln_before × init_weights × phm_layer, plus every
other option value), gradients and training, the active switch, merge (bottleneck adapters stay in the graph),
the pre-LN placement checked against a hand computation on GPT-2, save → load, and bad specs. Numeric tests
set non-zero adapter weights and assert the output moved. AdapterHub parity lives in
``tests/oracle/test_bottleneck_model_oracle.py``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, whatever the import mode

import graphadapt as ga  # noqa: E402
from graphadapt import load as load_checkpoint  # noqa: E402
from graphadapt.methods.bottleneck.module import BottleneckAdapter  # noqa: E402
from helpers import (  # noqa: E402
    t5_inputs, text_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, vit_inputs,
)

torch.set_num_threads(1)  # tiny tensors; the 2 cores are shared
ATOL = 1e-5

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "vit": tiny_vit}


def _inputs(kind: str, batch: int = 3, seq: int = 6) -> dict:
    """Padded inputs whose batch/sequence differ from the capture's example (2 × 9)."""
    if kind == "vit":
        return vit_inputs(batch, seed=5)
    if kind == "t5":
        x = t5_inputs(batch, seq, dec_seq=4, seed=5)
        x["attention_mask"] = text_inputs(batch, seq, seed=5, pad=2)["attention_mask"]
        return x
    x = text_inputs(batch, seq, seed=5, pad=2)
    if kind in ("gpt2", "llama"):
        x["use_cache"] = False
    return x


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).last_hidden_state


def _adapter_params(adapted, name: str | None = None) -> dict[str, torch.nn.Parameter]:
    prefix = "adapters." + (f"{name}." if name else "")
    return {n: p for n, p in adapted.named_parameters() if n.startswith(prefix)}


@torch.no_grad()
def _randomize(adapted, seed: int = 0, std: float = 0.2) -> None:
    """Every adapter tensor non-zero (norm weights near 1, scalings in [0.5, 2.5])."""
    g = torch.Generator().manual_seed(seed)
    for n, p in _adapter_params(adapted).items():
        if "norm" in n and n.endswith("weight"):
            p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
        elif n.endswith("scaling"):
            p.copy_(0.5 + 2.0 * torch.rand(p.shape, generator=g))
        elif ".W" in n or "phm_rule" in n:  # PHM weights are products of 2-3 factors: keep them O(0.1)
            p.copy_(3 * std * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


def _apply(kind, spec, seed=0):
    base = BUILDERS[kind]()
    return base, ga.apply(base, spec if isinstance(spec, ga.Spec) else ga.Spec({"a": spec}, seed=seed))


# --------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_mam_init_is_identity_then_weights_move_it(kind):
    """mam_adapter zero-initialises the up projection: the adapted model *is* the base model until trained."""
    base, adapted = _apply(kind, ga.DoubleSeqBn(reduction_factor=4, init_weights="mam_adapter"))
    recs = adapted.adapter_records
    n_layers = 4 if kind == "t5" else 2
    assert len(recs) == 2 * n_layers and {r.role for r in recs} == {"mh", "output"}
    for r in recs:
        mod = adapted.get_submodule(r.target)
        assert isinstance(mod, BottleneckAdapter)
        assert not mod.adapter_up.weight.any() and not mod.adapter_up.bias.any()
        assert mod.adapter_down.weight.any()  # only the up projection is zero: gradients still flow
    x = _inputs(kind)
    plain = _out(base, x)
    torch.testing.assert_close(_out(adapted, x), plain, atol=ATOL, rtol=ATOL)
    _randomize(adapted)
    assert (_out(adapted, x) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("spec", [
    ga.ParBn(),  # mam_adapter is ParBn's default
    ga.Compacter(reduction_factor=4, init_weights="mam_adapter"),  # PHM: the up projection's W_right is zero
    ga.AdapterPlus(reduction_factor=4, init_weights="mam_adapter"),  # channel scaling, residual after the norm
    ga.SeqBn(reduction_factor=4, init_weights="mam_adapter", ln_before=True, ln_after=True, use_gating=True),
], ids=["ParBn", "Compacter-mam", "AdapterPlus-mam", "SeqBn-mam-ln-gating"])
def test_other_zero_init_configs_are_identity(spec):
    base, adapted = _apply("bert", spec)
    x = _inputs("bert")
    plain = _out(base, x)
    torch.testing.assert_close(_out(adapted, x), plain, atol=ATOL, rtol=ATOL)
    _randomize(adapted)
    assert (_out(adapted, x) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["bert", "houlsby"])
def test_bert_and_houlsby_init_are_not_identity(init):
    """houlsby (like AdapterHub's) draws the up projection from trunc_normal(0, 1e-2): not zero, not the identity."""
    base, adapted = _apply("bert", ga.DoubleSeqBn(reduction_factor=4, init_weights=init))
    up = adapted.get_submodule("adapters.a.encoder.layer.0.output_adapter").adapter_up.weight
    assert up.abs().min() >= 0 and up.any()
    if init == "houlsby":
        assert up.abs().max() <= 2e-2
    x = _inputs("bert")
    assert (_out(adapted, x) - _out(base, x)).abs().max() > 1e-6


# --------------------------------------------------------------------------- option grid
def _grid_spec(ln_before, init, phm, **kw):
    base = dict(mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity="relu",
                original_ln_before=True, ln_before=ln_before, init_weights=init, phm_layer=phm)
    return ga.Bottleneck(**{**base, **kw})


def _construct_and_run(kind, spec):
    """apply (static shapes: 4× faster capture; dynamic shapes are covered by every other test) and run."""
    base = BUILDERS[kind]()
    x = _inputs(kind)
    adapted = ga.apply(base, ga.Spec({"a": spec}, seed=0), example_kwargs=x, dynamic=False)
    plain, got = _out(base, x), _out(adapted, x)
    assert got.shape == plain.shape and torch.isfinite(got).all()
    assert adapted.graph.lint() is None
    return base, adapted, x, plain, got


CORE_GRID = list(itertools.product([False, True], ["bert", "mam_adapter", "houlsby"], [False, True]))


@pytest.mark.parametrize("ln_before,init,phm", CORE_GRID, ids=lambda v: str(v))
def test_core_grid_bert(ln_before, init, phm):
    spec = _grid_spec(ln_before, init, phm)
    _, adapted, x, plain, got = _construct_and_run("bert", spec)
    mods = [adapted.get_submodule(r.target) for r in adapted.adapter_records]
    assert len(mods) == 4
    for m in mods:
        assert m.phm_layer is phm and m.ln_before is ln_before and m.init_weights == init
        assert hasattr(m, "adapter_norm_before") is ln_before
    # identity at init exactly for the zero-init scheme
    if init == "mam_adapter":
        torch.testing.assert_close(got, plain, atol=ATOL, rtol=ATOL)
    elif phm:
        # the PHM rule starts at N(0, phm_init_range=1e-4) (AdapterHub too): near-identity, yet not zero-init
        torch.testing.assert_close(got, plain, atol=1e-3, rtol=0)
        assert all(adapted.get_submodule(r.target).adapter_up.W_right.any() for r in adapted.adapter_records)
    else:
        assert (got - plain).abs().max() > 1e-6
    _randomize(adapted)
    assert (_out(adapted, x) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind,ln_before,init,phm", [
    ("llama", False, "mam_adapter", False), ("llama", True, "bert", True), ("llama", False, "houlsby", True),
    ("t5", True, "mam_adapter", True), ("t5", False, "houlsby", False),
], ids=lambda v: str(v))
def test_core_grid_llama_t5(kind, ln_before, init, phm):
    _, adapted, x, plain, got = _construct_and_run(kind, _grid_spec(ln_before, init, phm))
    assert {r.placement for r in adapted.adapter_records} == {"pre_ln"}
    assert all(adapted.get_submodule(r.target).norm_kind is None for r in adapted.adapter_records)
    if init == "mam_adapter":
        torch.testing.assert_close(got, plain, atol=ATOL, rtol=ATOL)
    _randomize(adapted)
    assert (_out(adapted, x) - plain).abs().max() > 1e-2


def _bn(**kw):
    base = dict(mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity="relu")
    return ga.Bottleneck(**{**base, **kw})


# each remaining option value at least once (test_other_options_cover_every_value checks the coverage)
OTHER = {
    "olb_F-ola_F-rbl_F": _bn(original_ln_before=False, original_ln_after=False, residual_before_ln=False),
    "olb_T-rbl_post_add-arbl-ln_after": _bn(original_ln_before=True, residual_before_ln="post_add",
                                            adapter_residual_before_ln=True, ln_after=True, non_linearity="gelu"),
    "parallel-scaling_float-gating": _bn(is_parallel=True, scaling=4.0, use_gating=True, non_linearity="swish"),
    "learned-dropout-stochastic_depth": _bn(scaling="learned", dropout=0.2, stochastic_depth=0.3,
                                            non_linearity="tanh"),
    "channel-mh_only-rf_dict": _bn(scaling="channel", output_adapter=False, reduction_factor={"1": 2, "default": 8},
                                   non_linearity="gelu_new"),
    "output_only-leave_out": _bn(mh_adapter=False, leave_out=[0], non_linearity="leakyrelu"),
    "layers": _bn(layers=[1], non_linearity="sigmoid"),
    # original_ln_before: the tiny BERT's raw sub-block output is ~1e-2, too small to move a bias-free adapter
    "phm-variants": _bn(phm_layer=True, original_ln_before=True, shared_W_phm=True, factorized_phm_rule=True, phm_rank=2, phm_bias=False,
                        learn_phm=False, phm_c_init="uniform", hypercomplex_nonlinearity="normal", phm_dim=2),
    "phm-unshared-unfactorized": _bn(phm_layer=True, shared_phm_rule=False, factorized_phm_W=False,
                                     hypercomplex_nonlinearity="glorot-normal"),
}


@pytest.mark.parametrize("case", list(OTHER))
def test_other_options_bert(case):
    spec = OTHER[case]
    _, adapted, x, plain, got = _construct_and_run("bert", spec)
    recs = adapted.adapter_records
    want_layers = set(spec.layers) if spec.layers is not None else {0, 1} - set(spec.leave_out)
    assert {r.layer for r in recs} == want_layers
    want_roles = {p for p, on in (("mh", spec.mh_adapter), ("output", spec.output_adapter)) if on}
    assert {r.role for r in recs} == want_roles
    for r in recs:
        m = adapted.get_submodule(r.target)
        assert m.bottleneck_size == max(1, int(32 // spec.reduction_for(r.layer)))
        assert m.is_parallel is spec.is_parallel and m.use_gating is spec.use_gating
        assert m.scaling_kind == ("float" if isinstance(spec.scaling, float) else spec.scaling)
    _randomize(adapted)
    moved = _out(adapted, x)
    assert (moved - plain).abs().max() > 1e-2
    if spec.dropout or spec.stochastic_depth:
        # training mode makes the adapter stochastic; eval mode is deterministic again
        adapted.train()
        with torch.no_grad():
            outs = [adapted(**x).last_hidden_state for _ in range(4)]
        adapted.eval()
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
        torch.testing.assert_close(_out(adapted, x), moved, atol=0, rtol=0)
    if spec.phm_layer and not spec.learn_phm:
        shared = dict(adapted.get_submodule("adapters.a.shared_phm").named_parameters())
        assert {"phm_rule_left", "phm_rule_right"} <= set(shared)
        assert not any(p.requires_grad for k, p in shared.items() if k.startswith("phm_rule"))


def test_other_options_cover_every_value():
    wanted = {
        "original_ln_before": {True, False}, "original_ln_after": {True, False},
        "residual_before_ln": {True, False, "post_add"}, "adapter_residual_before_ln": {True, False},
        "ln_after": {True, False}, "is_parallel": {True, False}, "use_gating": {True, False},
        "scaling": {"float", "learned", "channel"}, "mh_adapter": {True, False}, "output_adapter": {True, False},
        "shared_W_phm": {True, False}, "shared_phm_rule": {True, False}, "factorized_phm_W": {True, False},
        "factorized_phm_rule": {True, False}, "phm_bias": {True, False}, "learn_phm": {True, False},
        "phm_c_init": {"normal", "uniform"},
    }
    seen: dict = {k: set() for k in wanted}
    for spec in OTHER.values():
        for k in wanted:
            v = getattr(spec, k)
            seen[k].add("float" if k == "scaling" and isinstance(v, float) else v)
    assert seen == wanted
    assert len({s.non_linearity for s in OTHER.values()}) >= 7
    assert {s.hypercomplex_nonlinearity for s in OTHER.values()} >= {"normal", "glorot-normal", "glorot-uniform"}


# --------------------------------------------------------------------------- gradients and training
@pytest.mark.parametrize("kind,spec", [
    ("bert", ga.SeqBn(reduction_factor=4, ln_before=True, ln_after=True, use_gating=True, scaling="learned")),
    ("bert", ga.Compacter(reduction_factor=4)),
    ("llama", ga.DoubleSeqBn(reduction_factor=4, scaling="channel")),
], ids=["bert-SeqBn-all-params", "bert-Compacter", "llama-DoubleSeqBn"])
def test_gradients_reach_only_adapters_and_training_lowers_loss(kind, spec):
    base, adapted = _apply(kind, spec)
    src_flags = {n: p.requires_grad for n, p in base.named_parameters()}
    trainable = adapted.trainable_parameters()
    assert trainable and all(n.startswith("adapters.a.") for n in trainable)
    assert set(trainable) == set(_adapter_params(adapted))  # learn_phm=True: shared rules train too
    if spec.phm_layer:
        assert "adapters.a.shared_phm.phm_rule" in trainable

    x = _inputs(kind)
    target = torch.randn(_out(base, x).shape, generator=torch.Generator().manual_seed(1))

    def loss_fn():
        return torch.nn.functional.mse_loss(adapted(**x).last_hidden_state, target)

    adapted.train()
    loss_fn().backward()
    for n, p in adapted.named_parameters():
        if n.startswith("adapters."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert {n: p.requires_grad for n, p in base.named_parameters()} == src_flags  # caller's model untouched

    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    adapted.eval()
    with torch.no_grad():
        start = loss_fn().item()
    base_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if not n.startswith("adapters.")}
    for _ in range(15):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn().item()
    assert end < 0.9 * start, (start, end)
    for n, p in adapted.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


# --------------------------------------------------------------------------- active switch and merge
@pytest.fixture(scope="module")
def bert_double():
    base = tiny_bert()
    adapted = ga.apply(base, ga.Spec({"a": ga.DoubleSeqBn(reduction_factor=4)}, seed=0))
    _randomize(adapted)
    return base, adapted


def test_set_active_empty_is_base_model(bert_double):
    base, adapted = bert_double
    x = _inputs("bert")
    plain, on = _out(base, x), _out(adapted, x)
    assert (on - plain).abs().max() > 1e-2
    adapted.set_active([])
    try:
        assert adapted.active_adapters() == []
        torch.testing.assert_close(_out(adapted, x), plain, atol=ATOL, rtol=ATOL)
    finally:
        adapted.set_active(None)
    assert adapted.active_adapters() == ["a"]
    torch.testing.assert_close(_out(adapted, x), on, atol=0, rtol=0)


def test_merge_keeps_bottleneck_adapters(bert_double):
    _, adapted = bert_double
    x = _inputs("bert")
    before = _out(adapted, x)
    targets = {r.target for r in adapted.adapter_records}
    assert len(targets) == 4
    with pytest.raises(ga.MergeError) as err:
        adapted.merge(strict=True)
    assert all(t in str(err.value) for t in targets)
    assert not adapted.is_merged
    report = adapted.merge()
    try:
        assert report.folded == [] and set(report.kept) == targets
        assert all(isinstance(why, str) and why for why in report.kept.values())
        assert all("bottleneck" in why.lower() for why in report.kept.values())
        calls = {str(n.target) for n in adapted.graph.nodes if n.op == "call_module"}
        assert targets <= calls
        torch.testing.assert_close(_out(adapted, x), before, atol=0, rtol=0)
    finally:
        adapted.unmerge()
    torch.testing.assert_close(_out(adapted, x), before, atol=0, rtol=0)


# --------------------------------------------------------------------------- pre-LN placement (GPT-2, by hand)
def _force_branch(adapted, bias_seed=0):
    """down = I, up = ½·I, up.bias = c: the branch is A(x) = ½·relu(x) + c (reduction_factor 1)."""
    g = torch.Generator().manual_seed(bias_seed)
    cs = {}
    with torch.no_grad():
        for r in adapted.adapter_records:
            m = adapted.get_submodule(r.target)
            m.adapter_down.weight.copy_(torch.eye(32))
            m.adapter_down.bias.zero_()
            m.adapter_up.weight.copy_(0.5 * torch.eye(32))
            c = 0.1 * torch.randn(32, generator=g)
            m.adapter_up.bias.copy_(c)
            cs[(r.layer, r.role)] = c
    return cs


@pytest.mark.parametrize("reads", ["h", "h+r"])
def test_gpt2_pre_ln_placement_by_hand(reads):
    """insert_bottleneck's pre-LN rule on GPT-2: ``out = in + h`` becomes ``out = in + h + A(x)``, with ``x = h``
    (original_ln_before=False) or ``x = h + in`` (SeqBn's original_ln_before=True, no norm to apply): the stream
    stays un-normalised. Checked by hooking the same arithmetic into the *eager* base model."""
    spec = ga.Bottleneck(mh_adapter=True, output_adapter=True, reduction_factor=1, non_linearity="relu",
                         original_ln_before=(reads == "h+r"))
    base, adapted = _apply("gpt2", spec)
    assert {r.placement for r in adapted.adapter_records} == {"pre_ln"}
    cs = _force_branch(adapted)
    x = _inputs("gpt2")

    def A(v, c):
        return 0.5 * torch.relu(v) + c

    residual_in = {}
    hooks = []
    for i, block in enumerate(base.h):
        # the stream entering each sub-block is what its pre-norm reads
        hooks.append(block.ln_1.register_forward_pre_hook(lambda m, a, i=i: residual_in.__setitem__((i, "mh"), a[0])))
        hooks.append(block.ln_2.register_forward_pre_hook(
            lambda m, a, i=i: residual_in.__setitem__((i, "output"), a[0])))

        def after(role, i=i):
            def hook(m, args, out):
                h = out[0] if isinstance(out, tuple) else out
                v = h if reads == "h" else h + residual_in[(i, role)]
                new = h + A(v, cs[(i, role)])  # the block then adds the residual: in + h + A(x)
                return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
            return hook

        hooks.append(block.attn.register_forward_hook(after("mh")))
        hooks.append(block.mlp.register_forward_hook(after("output")))
    try:
        by_hand = _out(base, x)
    finally:
        for hk in hooks:
            hk.remove()
    plain = _out(base, x)
    got = _out(adapted, x)
    assert (by_hand - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, by_hand, atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("spec", [
    ga.Compacter(reduction_factor=4, use_gating=True, scaling="channel", ln_after=True),
    ga.Bottleneck(mh_adapter=True, output_adapter=True, reduction_factor={"0": 2, "default": 8},
                  non_linearity="gelu", is_parallel=True, scaling="learned", leave_out=[1]),
], ids=["Compacter-gating-channel", "parallel-rf_dict-leave_out"])
def test_save_then_load_into_fresh_model(spec, tmp_path):
    base, adapted = _apply("bert", spec)
    _randomize(adapted, seed=3)
    x = _inputs("bert")
    want = _out(adapted, x)
    assert (want - _out(base, x)).abs().max() > 1e-2
    adapted.save_adapters(tmp_path)
    fresh = tiny_bert()
    loaded = load_checkpoint(fresh, tmp_path)
    assert loaded.spec == adapted.spec
    assert set(loaded.state_dict()) == set(adapted.state_dict())
    torch.testing.assert_close(_out(loaded, x), want, atol=0, rtol=0)
    # a fresh apply with a different seed differs: the checkpoint, not the seed, restored the weights
    other = ga.apply(tiny_bert(), ga.Spec({"a": spec}, seed=1))
    assert (_out(other, x) - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize("spec,why", [
    (ga.Compacter(), "bottleneck size (1 = 32 // reduction_factor 32.0)"),  # default reduction 32 on hidden 32
    (ga.Compacter(reduction_factor=3), "bottleneck size (10"),
    (ga.CompacterPlusPlus(reduction_factor={"1": 16, "default": 4}), "reduction_factor 16"),  # layer 1 → 2
    (ga.SeqBn(reduction_factor=4, phm_layer=True, phm_dim=3), "phm_dim=3"),  # 8 % 3
])
def test_phm_size_not_divisible_is_spec_error(spec, why):
    with pytest.raises(ga.SpecError) as err:
        ga.apply(tiny_bert(), spec)
    assert err.value.field == "reduction_factor"
    assert "reduction_factor" in str(err.value) and why in str(err.value)


def test_bad_bottleneck_specs_name_their_field():
    for kwargs, field in [
        (dict(residual_before_ln="before"), "residual_before_ln"),
        (dict(scaling="per_head"), "scaling"),
        (dict(init_weights="xavier"), "init_weights"),
        (dict(reduction_factor={"0": 2}), "reduction_factor"),
        (dict(reduction_factor=0), "reduction_factor"),
        (dict(non_linearity="nope"), "non_linearity"),
        (dict(mh_adapter=False, output_adapter=False), "output_adapter"),
    ]:
        with pytest.raises(ga.SpecError) as err:
            _bn(**kwargs)
        assert err.value.field == field, (kwargs, err.value.field)
    # no layer left to adapt: a SpecError at apply time, before anything is built
    with pytest.raises(ga.SpecError) as err:
        ga.apply(tiny_bert(), _bn(layers=[5]))
    assert err.value.field == "layers"


# --------------------------------------------------------------------------- several adapters in one spec
@pytest.mark.parametrize("spec", [
    ga.Spec({"bn": ga.SeqBn(reduction_factor=4), "lora": ga.LoRA(targets=("q", "v", "o", "up", "down"))}),
    ga.Spec({"bn": ga.DoubleSeqBn(reduction_factor=4), "all": ga.LoRA(targets="all-linear"),
             "q": ga.LoRA(targets=("q",))}),
], ids=["seqbn+lora", "houlsby+2lora"])
def test_mixed_specs_every_adapter_matters(spec):
    """Bottleneck passes replace norms that LoRA inputs read; no adapter may end up disconnected."""
    adapted = ga.apply(tiny_bert(), spec).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    kw = text_inputs(3, 7)
    y = adapted(**kw).last_hidden_state
    for name in spec.adapters:
        adapted.set_active([n for n in spec.adapters if n != name])
        assert (adapted(**kw).last_hidden_state - y).abs().max() > 1e-4, name
    adapted.set_active(None)
    torch.testing.assert_close(adapted(**kw).last_hidden_state, y)


def test_two_bottlenecks_at_one_point_is_a_spec_error():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ga.SpecError, match="Stack/Parallel"):
        ga.apply(model, ga.Spec({"a": ga.SeqBn(reduction_factor=4), "b": ga.SeqBn(reduction_factor=4)}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # different positions do not collide
    ga.apply(model, ga.Spec({"a": ga.SeqBn(reduction_factor=4),
                             "b": ga.Bottleneck(mh_adapter=True, output_adapter=False, reduction_factor=4,
                                                non_linearity="relu")}))
