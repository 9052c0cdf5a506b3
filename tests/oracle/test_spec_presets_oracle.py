"""Bottleneck presets against AdapterHub's own config classes.

Run with the oracle venv:
    /work/venvs/oracle/bin/python -m pytest tests/oracle/test_spec_presets_oracle.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, without a shared conftest

adapters = pytest.importorskip("adapters")

from graphadapt.methods.bottleneck import (  # noqa: E402
    ACTIVATIONS,
    AdapterPlus,
    Bottleneck,
    Compacter,
    CompacterPlusPlus,
    DoubleSeqBn,
    ParBn,
    SeqBn,
    adapterhub_config_dict,
)

# BnConfig fields graphadapt does not model (left at AdapterHub's defaults).
AH_ONLY = {"init_weights_seed", "inv_adapter", "inv_adapter_reduction_factor", "cross_adapter"}

PAIRS = [
    (SeqBn, adapters.SeqBnConfig, "seq_bn"),
    (DoubleSeqBn, adapters.DoubleSeqBnConfig, "double_seq_bn"),
    (ParBn, adapters.ParBnConfig, "par_bn"),
    (AdapterPlus, adapters.AdapterPlusConfig, None),
    (Compacter, adapters.CompacterConfig, "compacter"),
    (CompacterPlusPlus, adapters.CompacterPlusPlusConfig, "compacter++"),
]


@pytest.mark.parametrize("ours,theirs,name", PAIRS, ids=lambda v: getattr(v, "__name__", v))
def test_preset_equals_adapterhub_config(ours, theirs, name):
    mine = adapterhub_config_dict(ours())
    ref = theirs().to_dict()
    assert set(ref) - set(mine) == AH_ONLY
    assert set(mine) <= set(ref)
    for key, value in mine.items():
        assert value == ref[key] and type(value) in (type(ref[key]), float, dict, list), key
    # Same config through AdapterHub's own constructor and its string registry.
    assert adapters.BnConfig(**mine) == theirs()
    if name is not None:
        assert adapters.AdapterConfig.load(name).to_dict() == adapters.BnConfig(**mine).to_dict()


def test_overridden_preset_equals_adapterhub_config():
    spec = SeqBn(reduction_factor={"1": 8, "default": 16}, non_linearity="gelu", leave_out=(0,), scaling=2)
    ref = adapters.SeqBnConfig(reduction_factor={"1": 8, "default": 16}, non_linearity="gelu", leave_out=[0], scaling=2.0)
    assert adapters.BnConfig(**adapterhub_config_dict(spec)) == ref


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_are_accepted_by_adapterhub(name):
    from adapters.methods.modeling import Activation_Function_Class

    Activation_Function_Class(name)


def test_bottleneck_fields_cover_bnconfig():
    import dataclasses

    ours = {f.name for f in dataclasses.fields(Bottleneck)} - {"seed", "layers"}
    theirs = {f.name for f in dataclasses.fields(adapters.BnConfig)}
    assert theirs - ours == AH_ONLY and ours <= theirs
