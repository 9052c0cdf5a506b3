"""Property-based tests (hypothesis) over random small specs on a tiny BERT (issue #13).

For every spec drawn: ``apply`` leaves the caller's model (weights, requires_grad flags,
train/eval mode) and the global RNG untouched; merge∘unmerge and save∘load are the identity;
every error raised is a graphadapt error. 10-15 examples per property keep the file near a minute.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import graphadapt as ga

from helpers import max_diff, perturb_adapters, run_no_grad, text_inputs, tiny_bert

# no shrinking phase: one apply takes ~1 s, and a failure report with the drawn spec is enough
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROLES = ["q", "k", "v", "o", "up", "down"]

lora = st.builds(
    ga.LoRA, r=st.integers(1, 6), alpha=st.sampled_from([1, 4, 16, 2.5]),
    targets=st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True).map(tuple),
    use_rslora=st.booleans(), use_dora=st.booleans(),
    layers=st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True).map(tuple)))
ia3 = st.lists(st.sampled_from(["k", "v", "down"]), min_size=1, max_size=3, unique=True).map(
    lambda t: ga.IA3(targets=tuple(t), feedforward=tuple(x for x in t if x == "down")))
seqbn = st.builds(
    ga.SeqBn, reduction_factor=st.sampled_from([2, 4, 8, 16]),
    non_linearity=st.sampled_from(["relu", "gelu", "swish", "tanh"]), ln_before=st.booleans(),
    ln_after=st.booleans(), use_gating=st.booleans(), init_weights=st.sampled_from(["bert", "mam_adapter"]))
specs = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(lora, ia3, seqbn), min_size=1,
                        max_size=2).map(lambda d: ga.Spec(d, seed=7))


@pytest.fixture(scope="module")
def base():
    return tiny_bert()


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()}, model.training)


def _same(a, b) -> bool:
    sa, ga_, ta = a
    sb, gb, tb = b
    return ta == tb and ga_ == gb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)



@SETTINGS
@given(spec=specs, train=st.booleans(), frozen=st.booleans())
def test_apply_merge_save_properties(base, spec, train, frozen):
    base.train(train)
    if frozen:
        base.embeddings.word_embeddings.weight.requires_grad_(False)
    try:
        before, rng = _snapshot(base), torch.get_rng_state()
        try:
            adapted = ga.apply(base, spec)
        except ga.GraphAdaptError:
            event("refused with a GraphAdaptError")
            assert _same(before, _snapshot(base))
            return
        event("applied")
        assert _same(before, _snapshot(base)), "apply mutated the caller's model"
        assert torch.equal(rng, torch.get_rng_state()), "apply moved the global RNG"
        assert adapted.training == train

        adapted.eval()
        perturb_adapters(adapted, std=0.05)  # zero-initialised LoRA B would make every identity trivial
        x = text_inputs(2, 5)
        out = run_no_grad(adapted, x)
        state = {k: v.clone() for k, v in adapted.state_dict().items()}
        adapted.merge()  # not in place: the caller's weights stay
        assert max_diff(run_no_grad(adapted, x), out) < 1e-4
        adapted.unmerge()
        assert all(torch.equal(v, state[k]) for k, v in adapted.state_dict().items())
        assert max_diff(run_no_grad(adapted, x), out) == 0.0
        assert _same(before, _snapshot(base))

        with tempfile.TemporaryDirectory() as d:
            adapted.save_adapters(d)
            with torch.no_grad():  # wipe the adapters, then load them back from disk
                for n, p in adapted.named_parameters():
                    if n.startswith("adapters."):
                        p.zero_()
            assert max_diff(run_no_grad(adapted, x), out) > 0
            adapted.load_adapters(d)
        assert all(torch.equal(v, state[k]) for k, v in adapted.state_dict().items())
        assert max_diff(run_no_grad(adapted, x), out) == 0.0
    finally:
        base.eval()
        base.embeddings.word_embeddings.weight.requires_grad_(True)


# anything at all, including nonsense, where a method field is expected
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                 st.text(max_size=4), st.lists(st.integers(-2, 5), max_size=3))


@settings(SETTINGS, max_examples=15)
@given(method=st.sampled_from(["lora", "ia3", "bottleneck"]),
       field=st.sampled_from(["r", "alpha", "targets", "layers", "leave_out", "dropout", "reduction_factor",
                              "non_linearity", "mh_adapter", "init_weights", "seed"]),
       value=junk, name=st.sampled_from(["a", "training", "1x", "adapters", ""]))
def test_any_error_is_a_graphadapt_error(base, method, field, value, name):
    d = {"method": method, field: value}
    before = _snapshot(base)
    try:
        adapted = ga.apply(base, {"adapters": {name: d}})
    except ga.GraphAdaptError:
        event("refused with a GraphAdaptError")
    else:
        event("applied")
        assert isinstance(adapted, ga.AdaptedModel)
    assert _same(before, _snapshot(base))
