"""AdapterHub ``adapters`` 1.3.0 ReFT checkpoints (``loreft``, ``noreft``, ``direft``) → graphadapt (oracle venv),
fp32 1e-5, on BERT (post-LN) and GPT-2 / Llama (pre-LN), with right-padded rows (positions come from the mask).

Each case: a tiny seeded model gets AdapterHub ReFT adapter ``"a"``, every ReFT tensor is set non-zero random
(an orthogonal projection's ``original`` keeps ±1 on its diagonal: torch's Householder map reads the diagonal's
integer part as the column signs), ``save_adapter`` writes it and ``import_adapterhub`` loads it onto an untouched
copy of the base model.
"""

from __future__ import annotations

import json

import pytest
import torch

import adapters
from adapters import DiReftConfig, LoReftConfig, NoReftConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from helpers import tiny_bert, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
ATOL = RTOL = 1e-5
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@torch.no_grad()
def randomize_refts(model, name="a", seed=3) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".refts.{name}." not in f".{pname}":
            continue
        new = 0.3 * torch.randn(p.shape, generator=g)
        if pname.endswith("parametrizations.weight.original"):  # [r, H]: keep a ±1 diagonal (the column signs)
            r = p.shape[0]
            new[torch.arange(r), torch.arange(r)] = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0)
        p.copy_(new)
        n += 1
    return n


def _ah(kind, cfg, name="a"):
    m = BUILD[kind](seed=0)
    adapters.init(m)
    m.add_adapter(name, config=cfg)
    assert randomize_refts(m, name) > 0
    m.set_active_adapters(name)
    return m.eval()


def _outputs(ah, adapted, base, kind):
    x = oracle_inputs(kind)
    with torch.no_grad():
        return tuple(m(**x).last_hidden_state for m in (ah, adapted.eval(), base))


def _set_config(directory, **kw):
    cfg_file = directory / "adapter_config.json"
    meta = json.loads(cfg_file.read_text())
    meta["config"].update(kw)
    cfg_file.write_text(json.dumps(meta))


CASES = {
    "bert-loreft": ("bert", LoReftConfig(prefix_positions=2, suffix_positions=2, r=2)),
    "bert-noreft-tied-act": ("bert", NoReftConfig(prefix_positions=1, suffix_positions=2, r=3, tied_weights=True,
                                                  non_linearity="tanh")),
    "bert-direft-layer1": ("bert", DiReftConfig(layers=[1], r=2)),
    "gpt2-loreft-suffix": ("gpt2", LoReftConfig(prefix_positions=0, suffix_positions=2, r=2)),
    "gpt2-noreft": ("gpt2", NoReftConfig(prefix_positions=2, suffix_positions=1, r=2)),
    "llama-loreft-tied": ("llama", LoReftConfig(prefix_positions=2, suffix_positions=1, r=1, tied_weights=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    kind, cfg = CASES[case]
    ah = _ah(kind, cfg)
    ah.save_adapter(str(tmp_path), "a")
    if not cfg.subtract_projection:  # not saved by AdapterHub (see the next test): say it in the config
        _set_config(tmp_path, subtract_projection=False)
    base = BUILD[kind](seed=0)
    adapted = ga.import_adapterhub(base, tmp_path)
    assert isinstance(adapted.spec.adapters["a"], ga.Reft)
    n_ah = sum(1 for n, _ in ah.named_modules() if n.endswith(".refts.a"))
    assert len(adapted.adapter_records) == n_ah
    want, got, plain = _outputs(ah, adapted, base, kind)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 1e-2  # the intervention does something


def test_direft_subtract_projection_is_not_saved(tmp_path):
    """AdapterHub does not save DiReFT's subtract_projection=False: its own load_adapter reads the directory back
    as subtract_projection=True, and so does the importer; an explicit key in the config is honoured."""
    kind = "bert"
    ah = _ah(kind, DiReftConfig(prefix_positions=2, suffix_positions=1, r=2))
    ah.save_adapter(str(tmp_path), "a")
    reloaded = BUILD[kind](seed=0)
    adapters.init(reloaded)
    reloaded.load_adapter(str(tmp_path), set_active=True)
    reloaded.eval()
    adapted = ga.import_adapterhub(BUILD[kind](seed=0), tmp_path)
    assert adapted.spec.adapters["a"].subtract_projection is True
    want, got, _ = _outputs(reloaded, adapted, BUILD[kind](seed=0), kind)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    _set_config(tmp_path, subtract_projection=False)
    adapted = ga.import_adapterhub(BUILD[kind](seed=0), tmp_path)
    want, got, _ = _outputs(ah, adapted, BUILD[kind](seed=0), kind)   # the in-memory DiReFT model
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - _outputs(reloaded, adapted, BUILD[kind](seed=0), kind)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["loreft", "noreft", "direft"])
def test_presets(preset):
    spec = from_adapterhub_config(preset)
    cfg = adapters.AdapterConfig.load(preset)
    assert (spec.orthogonality, spec.subtract_projection, spec.prefix_positions, spec.r) == (
        cfg.orthogonality, cfg.subtract_projection, cfg.prefix_positions, cfg.r)
    assert from_adapterhub_config(cfg.to_dict()).orthogonality == cfg.orthogonality
