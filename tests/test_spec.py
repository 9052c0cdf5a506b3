"""Spec layer: validation, presets, serialisation round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from graphadapt.errors import SpecError
from graphadapt.methods.bottleneck import (
    ACTIVATIONS,
    PRESETS,
    AdapterPlus,
    Bottleneck,
    Compacter,
    CompacterPlusPlus,
    DoubleSeqBn,
    ParBn,
    SeqBn,
    adapterhub_config_dict,
)
from graphadapt.methods.lora import LoRA
from graphadapt.spec import MethodSpec, Spec, as_spec, selector_matches

BN_REQUIRED = dict(mh_adapter=True, output_adapter=False, reduction_factor=8, non_linearity="relu")

# (constructor, kwargs, expected .field, words the message must contain)
BAD = [
    (LoRA, dict(r=0), "r", ["integer", ">= 1"]),
    (LoRA, dict(r=-3), "r", [">= 1"]),
    (LoRA, dict(r=2.0), "r", ["integer"]),
    (LoRA, dict(r=True), "r", ["integer"]),
    (LoRA, dict(alpha=0), "alpha", ["> 0"]),
    (LoRA, dict(alpha=-1.5), "alpha", ["> 0"]),
    (LoRA, dict(dropout=1.0), "dropout", ["[0.0, 1.0)"]),
    (LoRA, dict(dropout=-0.1), "dropout", ["[0.0, 1.0)"]),
    (LoRA, dict(targets=("q", "query")), "targets", ["q, k, v, o, up, gate, down", "all-linear", "re:", "glob"]),
    (LoRA, dict(targets=("Q",)), "targets", ["q, k, v, o, up, gate, down"]),
    (LoRA, dict(targets=()), "targets", ["empty"]),
    (LoRA, dict(targets=("re:(unclosed",)), "targets", ["does not compile"]),
    (LoRA, dict(targets=("q", 3)), "targets", ["strings"]),
    (LoRA, dict(init="kaiming"), "init", ["'lora'", "'gaussian'", "'bert'", "'pissa'"]),
    (LoRA, dict(use_dora=True, use_gating=True), "use_gating", ["use_dora", "use_gating", "merge"]),
    (LoRA, dict(use_rslora=1), "use_rslora", ["True or False"]),
    (LoRA, dict(layers=(0, -1)), "layers", ["ints >= 0"]),
    (LoRA, dict(layers="0,1"), "layers", ["ints >= 0"]),
    (LoRA, dict(leave_out=(1.5,)), "leave_out", ["ints >= 0"]),
    (LoRA, dict(seed=-1), "seed", ["None or an integer >= 0"]),
    (LoRA, dict(seed=True), "seed", ["None or an integer >= 0"]),
    (SeqBn, dict(seed=-5), "seed", ["None or an integer >= 0"]),
    (SeqBn, dict(non_linearity="softmax"), "non_linearity", ["relu", "gelu", "swish", "tanh", "leakyrelu"]),
    (SeqBn, dict(reduction_factor={"0": 8}), "reduction_factor", ['"default"']),
    (SeqBn, dict(reduction_factor={"first": 8, "default": 16}), "reduction_factor", ["layer index", "default"]),
    (SeqBn, dict(reduction_factor={"0": -2, "default": 16}), "reduction_factor", ["> 0"]),
    (SeqBn, dict(reduction_factor=0), "reduction_factor", ["> 0", "default"]),
    (SeqBn, dict(reduction_factor="16"), "reduction_factor", ["> 0"]),
    (SeqBn, dict(init_weights="xavier"), "init_weights", ["'bert'", "'mam_adapter'", "'houlsby'"]),
    (SeqBn, dict(scaling="fixed"), "scaling", ["'learned'", "'channel'"]),
    (SeqBn, dict(scaling=True), "scaling", ["'learned'", "'channel'"]),
    (SeqBn, dict(residual_before_ln="pre_add"), "residual_before_ln", ["'post_add'"]),
    (SeqBn, dict(dropout=1.5), "dropout", ["[0.0, 1.0)"]),
    (SeqBn, dict(stochastic_depth=1.0), "stochastic_depth", ["[0.0, 1.0)"]),
    (SeqBn, dict(mh_adapter=False, output_adapter=False), "output_adapter", ["mh_adapter", "output_adapter"]),
    (SeqBn, dict(ln_before="yes"), "ln_before", ["True or False"]),
    (SeqBn, dict(phm_dim=0), "phm_dim", [">= 1"]),
    (SeqBn, dict(phm_rank=0), "phm_rank", [">= 1"]),
    (SeqBn, dict(phm_c_init="zeros"), "phm_c_init", ["'normal'", "'uniform'"]),
    (SeqBn, dict(hypercomplex_nonlinearity="xavier"), "hypercomplex_nonlinearity", ["'glorot-uniform'", "'phm'"]),
    (SeqBn, dict(phm_init_range=0.0), "phm_init_range", ["> 0"]),
    (SeqBn, dict(leave_out=(-1,)), "leave_out", ["ints >= 0"]),
    (Bottleneck, dict(BN_REQUIRED, non_linearity="Softplus"), "non_linearity", ["relu"]),
]


@pytest.mark.parametrize("cls,kwargs,field,words", BAD, ids=lambda v: repr(v)[:40])
def test_bad_field_raises_spec_error_naming_field(cls, kwargs, field, words):
    with pytest.raises(SpecError) as info:
        cls(**kwargs)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# (spec kwargs, expected .field, words)
BAD_SPEC = [
    (dict(adapters={"my-adapter": LoRA()}), "adapters", ["identifier", "submodule"]),
    (dict(adapters={"1st": LoRA()}), "adapters", ["identifier"]),
    (dict(adapters={"class": LoRA()}), "adapters", ["identifier", "keyword"]),
    (dict(adapters={"a.b": LoRA()}), "adapters", ["identifier"]),
    (dict(adapters={}), "adapters", ["at least one"]),
    (dict(adapters={"a": 3}), "adapters", ["method spec"]),
    (dict(adapters={"a": LoRA()}, active=("a", "b")), "active", ["'b'", "adapters: a"]),
    (dict(adapters={"a": LoRA()}, active="b"), "active", ["'b'"]),
    (dict(adapters={"a": LoRA()}, seed=-1), "seed", ["None or an integer >= 0"]),
    (dict(adapters={"a": LoRA()}, seed=1.0), "seed", ["None or an integer >= 0"]),
]


@pytest.mark.parametrize("kwargs,field,words", BAD_SPEC, ids=lambda v: repr(v)[:40])
def test_bad_spec_raises_spec_error_naming_field(kwargs, field, words):
    with pytest.raises(SpecError) as info:
        Spec(**kwargs)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ------------------------------------------------------------------ LoRA
def test_lora_defaults_and_scaling():
    lora = LoRA()
    assert (lora.r, lora.alpha, lora.dropout, lora.targets, lora.init) == (8, 8, 0.0, ("q", "v"), "lora")
    assert lora.scaling == 1.0
    assert LoRA(r=8, alpha=16).scaling == 2.0
    assert LoRA(r=8, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))
    assert LoRA(r=4, alpha=2.5).scaling == 0.625


def test_lora_targets_normalised_and_split():
    assert LoRA(targets="q").targets == ("q",)
    assert LoRA(targets=["q", "v", "q"]).targets == ("q", "v")
    lora = LoRA(targets=["down", "all-linear", "*.attention.*.query", "re:.*\\.value$", "encoder.layer.0.output.dense"])
    # all-linear: every role, the mixture-of-experts and latent-attention ones included
    assert lora.role_targets() == ("q", "k", "v", "o", "up", "gate", "down", "router", "shared_expert_gate",
                                   "expert_up", "expert_gate", "expert_down", "q_a", "q_b", "kv_a", "kv_b",
                                   "mixer_in", "mixer_inner", "mixer_out")
    assert lora.path_targets() == ("*.attention.*.query", "re:.*\\.value$", "encoder.layer.0.output.dense")
    assert LoRA(targets=("v", "up", "q")).role_targets() == ("q", "v", "up")
    assert LoRA(targets=("*.dense",)).role_targets() == ()
    assert lora.selects_path("bert.encoder.layer.3.attention.self.query")
    assert lora.selects_path("encoder.layer.1.attention.self.value")
    assert lora.selects_path("bert.encoder.layer.0.output.dense")
    assert not lora.selects_path("bert.encoder.layer.1.output.dense")


@pytest.mark.parametrize(
    "selector,path,expected",
    [
        ("*.query", "encoder.layer.0.attention.self.query", True),
        ("*.query", "encoder.layer.0.attention.self.query_proj", False),
        ("layer.[01].*", "layer.1.mlp", True),
        ("re:.*layer\\.\\d+\\.mlp", "model.layer.12.mlp", True),
        ("re:layer", "model.layer.12.mlp", False),  # regexes full-match
        ("self.query", "encoder.layer.0.attention.self.query", True),
        ("self.query", "encoder.layer.0.attention.myself.query", False),
    ],
)
def test_selector_matches(selector, path, expected):
    assert selector_matches(selector, path) is expected


def test_lora_layers_canonicalised_and_includes_layer():
    lora = LoRA(layers=[3, 1, 3], leave_out=[1])
    assert lora.layers == (1, 3)
    assert lora == LoRA(layers=(1, 3), leave_out=(1,))
    assert [i for i in range(5) if lora.includes_layer(i)] == [3]
    assert [i for i in range(3) if LoRA(leave_out=(0,)).includes_layer(i)] == [1, 2]


def test_seed_zero_is_valid_and_kw_only():
    assert LoRA(seed=0).seed == 0
    assert LoRA(4).r == 4  # first positional is r, not the base class's seed


def test_specs_are_frozen_and_hashable():
    lora = LoRA()
    with pytest.raises(dataclasses.FrozenInstanceError):
        lora.r = 4  # type: ignore[misc]
    bn = SeqBn(reduction_factor={"0": 4, "default": 16})
    assert len({lora, LoRA(), bn, SeqBn(reduction_factor={"default": 16, 0: 4})}) == 2
    spec = Spec({"a": lora, "b": bn})
    assert hash(spec) == hash(Spec({"b": bn, "a": lora}))
    with pytest.raises(TypeError):
        spec.adapters["c"] = LoRA()  # type: ignore[index]


def test_replace_revalidates():
    assert LoRA().replace(r=4).r == 4
    with pytest.raises(SpecError):
        LoRA().replace(r=0)


def test_field_help_on_every_field():
    for cls in (LoRA, Bottleneck, *PRESETS.values()):
        helps = cls.field_help()
        assert set(helps) == {f.name for f in dataclasses.fields(cls)}
        assert all(h for h in helps.values())
    assert all(f.metadata.get("help") for f in dataclasses.fields(Spec))


# ------------------------------------------------------------------ Bottleneck
def test_bottleneck_requires_core_fields_and_presets_do_not():
    with pytest.raises(TypeError):
        Bottleneck()  # type: ignore[call-arg]
    with pytest.raises(SpecError) as info:
        MethodSpec.from_dict({"method": "bottleneck", "mh_adapter": True})
    assert info.value.field == "output_adapter"
    bn = Bottleneck(**BN_REQUIRED)
    assert not isinstance(bn, SeqBn)
    assert bn.reduction_factor == 8.0 and isinstance(bn.reduction_factor, float)


def test_reduction_factor_mapping():
    bn = SeqBn(reduction_factor={"0": 4, 2: 8, "default": 16})
    assert dict(bn.reduction_factor) == {"0": 4.0, "2": 8.0, "default": 16.0}
    assert [bn.reduction_for(i) for i in range(4)] == [4.0, 16.0, 8.0, 16.0]
    assert SeqBn().reduction_for(7) == 16.0
    assert bn.bottleneck_size(768, 0) == 192
    assert SeqBn(reduction_factor=1000).bottleneck_size(768, 0) == 1


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_adapterhub_activation_accepted(name):
    assert SeqBn(non_linearity=name).non_linearity == name


def test_activation_case_and_alias():
    assert SeqBn(non_linearity="ReLU").non_linearity == "relu"
    assert SeqBn(non_linearity="gelu_orig").non_linearity == "gelu"
    assert SeqBn(non_linearity="gelu_orig") == SeqBn(non_linearity="gelu")


def test_scaling_number_becomes_float():
    assert SeqBn(scaling=4).scaling == 4.0 and isinstance(SeqBn(scaling=4).scaling, float)
    assert SeqBn(scaling="learned").scaling == "learned"
    assert SeqBn(residual_before_ln="post_add").residual_before_ln == "post_add"


# Values as read from adapters 1.3.0 configuration/adapter_config.py.
BN_BASE_DEFAULTS = dict(
    original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, init_weights="bert",
    is_parallel=False, scaling=1.0, use_gating=False, residual_before_ln=True, adapter_residual_before_ln=False,
    leave_out=(), dropout=0.0, phm_layer=False, phm_dim=4, factorized_phm_W=True, shared_W_phm=False,
    shared_phm_rule=True, factorized_phm_rule=False, phm_c_init="normal", phm_init_range=0.0001, learn_phm=True,
    hypercomplex_nonlinearity="glorot-uniform", phm_rank=1, phm_bias=True, stochastic_depth=0.0,
)
PRESET_VALUES = {
    SeqBn: dict(
        original_ln_before=True, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
        ln_before=False, ln_after=False, mh_adapter=False, output_adapter=True, non_linearity="relu",
        reduction_factor=16,
    ),
    DoubleSeqBn: dict(
        original_ln_before=False, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
        ln_before=False, ln_after=False, mh_adapter=True, output_adapter=True, non_linearity="swish",
        reduction_factor=16,
    ),
    ParBn: dict(
        original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, mh_adapter=False,
        output_adapter=True, non_linearity="relu", reduction_factor=2, init_weights="mam_adapter",
        is_parallel=True, scaling=4.0,
    ),
    AdapterPlus: dict(
        original_ln_after=False, original_ln_before=True, residual_before_ln=False, stochastic_depth=0.1,
        init_weights="houlsby", scaling="channel", mh_adapter=False, output_adapter=True, reduction_factor=96,
        non_linearity="gelu",
    ),
    Compacter: dict(  # DoubleSeqBn + PHM
        original_ln_before=False, original_ln_after=True, mh_adapter=True, output_adapter=True,
        phm_layer=True, reduction_factor=32, non_linearity="gelu",
    ),
    CompacterPlusPlus: dict(  # SeqBn + PHM
        original_ln_before=True, original_ln_after=True, mh_adapter=False, output_adapter=True,
        phm_layer=True, reduction_factor=32, non_linearity="gelu",
    ),
}


@pytest.mark.parametrize("cls", list(PRESET_VALUES), ids=lambda c: c.__name__)
def test_preset_values_match_adapterhub(cls):
    preset = cls()
    expected = {**BN_BASE_DEFAULTS, **PRESET_VALUES[cls]}
    for name, value in expected.items():
        assert getattr(preset, name) == value, name
    assert isinstance(preset, Bottleneck)
    assert preset.seed is None and preset.layers is None


def test_preset_names_and_overrides():
    assert set(PRESETS) == {"seq_bn", "double_seq_bn", "par_bn", "adapter_plus", "compacter", "compacter++"}
    custom = SeqBn(reduction_factor=8)
    assert isinstance(custom, SeqBn) and isinstance(custom, Bottleneck)
    assert custom.reduction_factor == 8.0 and custom.non_linearity == "relu"
    assert isinstance(CompacterPlusPlus(), SeqBn) and isinstance(Compacter(), DoubleSeqBn)


def test_adapterhub_config_dict():
    d = adapterhub_config_dict(ParBn(leave_out=(1,), seed=3))
    assert d["scaling"] == 4.0 and d["is_parallel"] is True and d["leave_out"] == [1]
    assert not {"seed", "layers", "method", "preset"} & set(d)
    d = adapterhub_config_dict(SeqBn(reduction_factor={"1": 8, "default": 16}))
    assert d["reduction_factor"] == {"1": 8.0, "default": 16.0} and type(d["reduction_factor"]) is dict
    with pytest.raises(SpecError) as info:
        adapterhub_config_dict(SeqBn(layers=(0, 2)))
    assert info.value.field == "layers"
    assert adapterhub_config_dict(SeqBn(layers=(0, 2), leave_out=(2,)), num_layers=4)["leave_out"] == [1, 2, 3]
    with pytest.raises(SpecError):
        adapterhub_config_dict(LoRA())  # type: ignore[arg-type]


# ------------------------------------------------------------------ round trips
ROUND_TRIP_METHODS = [
    *(cls() for cls in PRESETS.values()),
    SeqBn(reduction_factor={"0": 4, "default": 16}, leave_out=[11, 10], seed=7),
    ParBn(scaling="learned", non_linearity="tanh", layers=[0, 1]),
    AdapterPlus(residual_before_ln="post_add", dropout=0.1),
    Compacter(phm_dim=8, phm_init_range=1e-5, factorized_phm_rule=True),
    Bottleneck(**BN_REQUIRED, ln_after=True, adapter_residual_before_ln=True),
    LoRA(),
    LoRA(r=16, alpha=32.5, dropout=0.05, targets=["all-linear"], use_rslora=True, seed=0),
    LoRA(targets=("q", "re:.*\\.fc[12]$", "*.attn.*", "h.0.mlp.c_fc"), layers=[0, 2], leave_out=(2,), init="pissa"),
    LoRA(use_dora=True, init="gaussian"),
    LoRA(use_gating=True, init="bert"),
]


@pytest.mark.parametrize("method", ROUND_TRIP_METHODS, ids=lambda m: f"{type(m).__name__}")
def test_method_round_trips(method, tmp_path):
    d = method.to_dict()
    assert d["method"] == method.method
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    back = MethodSpec.from_dict(d)
    assert back == method and type(back) is type(method)
    assert type(method).from_dict(d) == method

    spec = Spec({"task": method, "other": LoRA(r=2)}, active=["task"], seed=5)
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_json(spec.to_json()) == spec
    assert Spec.from_yaml(spec.to_yaml()) == spec
    for suffix in (".json", ".yaml", ".yml"):
        path = spec.save(tmp_path / f"spec{suffix}")
        loaded = Spec.load(path)
        assert loaded == spec and hash(loaded) == hash(spec)
        assert as_spec(path) == spec and as_spec(str(path)) == spec


def test_preset_dict_records_preset_name():
    d = CompacterPlusPlus(reduction_factor=8).to_dict()
    assert d["method"] == "bottleneck" and d["preset"] == "compacter++"
    assert "preset" not in Bottleneck(**BN_REQUIRED).to_dict()
    # Same values but a different class are different specs (presets round-trip to their class).
    assert Bottleneck(**{k: v for k, v in d.items() if k not in ("method", "preset")}) != CompacterPlusPlus(reduction_factor=8)


def test_from_dict_errors():
    with pytest.raises(SpecError) as info:
        MethodSpec.from_dict({"r": 4})
    assert info.value.field == "method" and "lora" in str(info.value)
    with pytest.raises(SpecError) as info:
        MethodSpec.from_dict({"method": "prefix"})
    assert info.value.field == "method" and "bottleneck" in str(info.value)
    with pytest.raises(SpecError) as info:
        MethodSpec.from_dict({"method": "bottleneck", "preset": "pfeifer"})
    assert info.value.field == "preset" and "seq_bn" in str(info.value)
    with pytest.raises(SpecError) as info:
        MethodSpec.from_dict({"method": "lora", "rank": 4})
    assert info.value.field == "rank" and "alpha" in str(info.value)
    with pytest.raises(SpecError) as info:
        LoRA.from_dict(SeqBn().to_dict())
    assert info.value.field == "method"
    assert LoRA.from_dict({"r": 4}) == LoRA(r=4)  # method implied by the class
    assert SeqBn.from_dict({"method": "bottleneck", "preset": "seq_bn"}) == SeqBn()
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"adapters": {"a": {"method": "lora"}}, "activ": ["a"]})
    assert info.value.field == "activ"
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"adapters": {"a": {"method": "lora"}}, "version": 99})
    assert info.value.field == "version"
    with pytest.raises(SpecError):
        Spec.from_json("{not json")
    with pytest.raises(SpecError):
        Spec.from_yaml("adapters: [unclosed")


def test_yaml_reads_exponent_floats_and_int_keys():
    text = """
adapters:
  task:
    method: bottleneck
    preset: compacter
    phm_init_range: 1e-4
    reduction_factor: {3: 8, default: 32}
"""
    spec = Spec.from_yaml(text)
    assert spec.adapters["task"] == Compacter(phm_init_range=0.0001, reduction_factor={"3": 8, "default": 32})
    assert spec.seed == 0 and spec.active is None


# ------------------------------------------------------------------ Spec
def test_spec_active_and_seeds():
    spec = Spec({"a": LoRA(seed=11), "b": SeqBn()})
    assert spec.active is None and spec.active_names == ("a", "b")
    assert spec.effective_seed("a") == 11 and spec.effective_seed("b") == 0
    spec = Spec({"a": LoRA(seed=0), "b": SeqBn()}, active="b", seed=42)
    assert spec.active == ("b",) and spec.active_names == ("b",)
    assert spec.effective_seed("a") == 0 and spec.effective_seed("b") == 42
    with pytest.raises(SpecError):
        spec.effective_seed("c")
    unseeded = Spec({"a": LoRA()}, seed=None)
    assert isinstance(unseeded.effective_seed("a"), int)
    assert unseeded.effective_seed("a") == unseeded.effective_seed("a")  # one draw per Spec
    assert unseeded.to_dict()["seed"] is None


def test_spec_adapters_accept_method_dicts_and_preserve_order():
    spec = Spec({"z": {"method": "lora", "r": 2}, "a": SeqBn()})
    assert spec.adapters["z"] == LoRA(r=2)
    assert list(spec.adapters) == ["z", "a"]
    assert list(Spec.from_json(spec.to_json()).adapters) == ["z", "a"]


def test_as_spec(tmp_path):
    lora = LoRA(r=4)
    spec = Spec({"default": lora})
    assert as_spec(spec) is spec
    assert as_spec(lora) == spec
    assert as_spec(spec.to_dict()) == spec
    assert as_spec(lora.to_dict()) == spec
    assert as_spec(str(spec.save(tmp_path / "s.yml"))) == spec
    # a dict of adapter names to methods (or their dicts), as the docs show apply(model, {"x": LoRA()})
    two = Spec({"x": lora, "adapters": SeqBn()})
    assert as_spec({"x": lora, "adapters": SeqBn()}) == two
    assert as_spec({"x": lora.to_dict(), "adapters": SeqBn().to_dict()}) == two
    assert as_spec(two.to_dict()) == two
    with pytest.raises(SpecError, match=r"adapters\['y'\] must be a method spec"):
        as_spec({"x": lora, "y": 3})
    with pytest.raises(SpecError, match="needs an 'adapters' mapping"):
        as_spec({"seed": 0})
    for bad in (42, None, ["q"], "lora", tmp_path / "missing.json", tmp_path / "spec.toml"):
        with pytest.raises(SpecError) as info:
            as_spec(bad)
        assert "Spec" in str(info.value) or "does not exist" in str(info.value)


def test_save_load_unknown_suffix(tmp_path):
    spec = Spec({"a": LoRA()})
    with pytest.raises(SpecError):
        spec.save(tmp_path / "spec.toml")
    with pytest.raises(SpecError):
        Spec.load(tmp_path / "spec.txt")


def test_pickle_and_deepcopy_keep_equality():
    import copy
    import pickle

    spec = Spec({"a": SeqBn(reduction_factor={"1": 2, "default": 4}), "b": LoRA()}, seed=None)
    for clone in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert clone == spec and clone.effective_seed("a") == spec.effective_seed("a")
