"""``import_adapterhub`` against real AdapterHub ``adapters`` 1.3.0 checkpoints (oracle venv).

Each case: a tiny seeded model gets an AdapterHub adapter ``"a"`` whose tensors are all set non-zero random,
``save_adapter(dir, "a")`` writes it; ``import_adapterhub`` applies the translated spec to an untouched copy of the
same base model and loads the weights (strict). Outputs are compared in eval mode (1e-5) and must differ from the
base model's.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import adapters
from adapters import CompacterConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

import graphadapt as ga
from graphadapt import import_adapterhub
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from graphadapt.errors import CheckpointError
from graphadapt.methods.bottleneck import adapterhub_config_dict
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert, tiny_gpt2, tiny_t5

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


def _save(ah_model, cfg, path, name: str = "a", **save_kwargs):
    adapters.init(ah_model)
    ah_model.add_adapter(name, config=cfg)
    assert randomize_adapterhub(ah_model, name, seed=1) > 0
    ah_model.set_active_adapters(name)
    ah_model.eval()
    ah_model.save_adapter(str(path), name, **save_kwargs)
    return ah_model


def _check(adapted, expected_model, base, kind):
    adapted.eval()
    x = oracle_inputs(kind)
    with torch.no_grad():
        expected = expected_model(**x).last_hidden_state
        got = adapted(**x).last_hidden_state
        plain = base(**x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2


CASES = {
    "bert-SeqBn": ("bert", SeqBnConfig(reduction_factor=4)),
    "bert-DoubleSeqBn": ("bert", DoubleSeqBnConfig(reduction_factor={"0": 2, "default": 8}, ln_after=True,
                                                   use_gating=True, scaling="channel")),
    "bert-ParBn": ("bert", ParBnConfig()),
    "gpt2-DoubleSeqBn": ("gpt2", DoubleSeqBnConfig(reduction_factor=4, ln_before=True, leave_out=[1])),
    "gpt2-ParBn": ("gpt2", ParBnConfig(scaling="learned")),
    # T5: layer.0 → mh, layer.1 (encoder) / layer.2 (decoder) → output; leave_out uses global indices (dec = 2, 3)
    "t5-DoubleSeqBn": ("t5", DoubleSeqBnConfig(reduction_factor=4, leave_out=[1, 2])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    kind, cfg = CASES[case]
    build = {"bert": tiny_bert, "gpt2": tiny_gpt2, "t5": tiny_t5}[kind]
    ah = _save(build(seed=0), cfg, tmp_path)
    base = build(seed=0)
    adapted = import_adapterhub(base, tmp_path)
    _check(adapted, ah, base, kind)
    # the spec round-trips: graphadapt's AdapterHub dict of the imported spec is AdapterHub's own config
    spec = adapted.spec.adapters["a"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    ours = adapterhub_config_dict(spec)
    assert {k: ours[k] for k in ours} == {k: saved[k] for k in ours}
    want = {(i, r) for i in range(4 if kind == "t5" else 2) if i not in set(cfg.leave_out) for r in
            (("mh", "output") if cfg.mh_adapter else ("output",))}
    assert {(r.layer, r.role) for r in adapted.adapter_records} == want


def test_safetensors(tmp_path):
    ah = _save(tiny_bert(seed=0), SeqBnConfig(reduction_factor=4), tmp_path, use_safetensors=True)
    assert not (tmp_path / "pytorch_adapter.bin").exists()
    base = tiny_bert(seed=0)
    _check(import_adapterhub(base, tmp_path), ah, base, "bert")


def test_rename_and_head_model_to_bare_compacter(tmp_path):
    """Compacter saved from BertForSequenceClassification (``bert.`` keys + shared PHM rule) loads into the bare
    BertModel under another name."""
    full = tiny_bert(seed=0, num_labels=2)
    base = copy.deepcopy(full.bert)
    ah = _save(full, CompacterConfig(reduction_factor=4), tmp_path)
    keys = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    assert "bert.shared_parameters.a.phm_rule" in keys
    with pytest.warns(UserWarning, match="without it"):  # the classifier cannot land in the bare model
        adapted = import_adapterhub(base, tmp_path, name="compact")
    assert set(adapted.spec.adapters) == {"compact"}
    assert adapted.spec.adapters["compact"].phm_layer
    torch.testing.assert_close(adapted.get_parameter("adapters.compact.shared_phm.phm_rule"), keys[
        "bert.shared_parameters.a.phm_rule"])
    _check(adapted, ah.bert, base, "bert")


def test_bare_compacter_lacks_shared_rule(tmp_path):
    """AdapterHub does not save ``shared_parameters`` of a bare base model: strict import says so."""
    _save(tiny_bert(seed=0), CompacterConfig(reduction_factor=4), tmp_path)
    with pytest.raises(CheckpointError, match="shared_phm.phm_rule"):
        import_adapterhub(tiny_bert(seed=0), tmp_path)
    adapted = import_adapterhub(tiny_bert(seed=0), tmp_path, strict=False)
    assert len(adapted.adapter_records) == 4


def test_wrong_architecture_is_strict_error(tmp_path):
    _save(tiny_gpt2(seed=0), SeqBnConfig(reduction_factor=4), tmp_path)
    with pytest.raises(CheckpointError, match="not filled|unused"):
        import_adapterhub(tiny_bert(seed=0), tmp_path)


def test_unsupported_architecture():
    """Every AdapterHub 1.3 architecture imports now; an unknown one is a clear error naming the supported ones."""
    with pytest.raises(CheckpointError, match="'hypothetical' adapters are not supported by the importer"):
        from_adapterhub_config({"architecture": "hypothetical"})


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn", "compacter", "compacter++"])
def test_from_adapterhub_config_presets(preset):
    cfg = adapters.AdapterConfig.load(preset)
    spec = from_adapterhub_config(cfg.to_dict())
    assert isinstance(spec, ga.Bottleneck)
    assert adapterhub_config_dict(spec) == adapterhub_config_dict(from_adapterhub_config(preset))
    assert adapters.BnConfig(**adapterhub_config_dict(spec)).to_dict() == cfg.to_dict()
