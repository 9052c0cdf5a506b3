"""AdapterHub ``adapters`` 1.3.0 VeRA-family checkpoints (``vera``, ``dvora``) → graphadapt ``VeraHub`` (oracle venv),
fp32 1e-5. AdapterHub runs VeRA only where every adapted site has one shape (its shared projections are created
once): BERT here (its GPT-2 and grouped-query Llama raise inside AdapterHub). Every per-site tensor (``vera_D``,
``vera_B``, DVoRA's ``m``) is set non-zero random — ``vera_B`` starts at zero, so an untouched adapter would do
nothing. The shared projections are read from the checkpoint (a model with a head saves them) or drawn again from
``init_weights_seed`` (a bare model does not save them)."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import DvoRAConfig, VeraConfig

import graphadapt as ga
from adapterhub_helpers import oracle_inputs
from graphadapt.checkpoints.adapterhub import from_adapterhub_config
from graphadapt.errors import CheckpointError
from helpers import tiny_bert

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


@torch.no_grad()
def randomize(model, name="a", seed=11) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in model.named_parameters():
        if f".loras.{name}." in f".{pname}":
            p.copy_((1.0 if pname.endswith("m.weight") else 0.0) * p + 0.3 * torch.randn(p.shape, generator=g))
            n += 1
    return n


def _ah(cfg, head=False):
    m = tiny_bert(seed=0, num_labels=2 if head else None)
    adapters.init(m)
    m.add_adapter("a", config=cfg)
    assert randomize(m) > 0
    m.set_active_adapters("a")
    return m.eval()


CASES = {
    "vera-seed": (VeraConfig(r=4, init_weights_seed=3), False),
    "vera-head-ffn-gated": (VeraConfig(r=2, alpha=4, selfattn_lora=False, intermediate_lora=True,
                                       use_gating=True), True),
    "dvora-seed": (DvoRAConfig(r=4, init_weights_seed=5), False),
    "dvora-head-leaveout": (DvoRAConfig(r=3, attn_matrices=["q", "k"], leave_out=[0]), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_adapterhub(case, tmp_path):
    cfg, head = CASES[case]
    ah = _ah(cfg, head)
    ah.save_adapter(str(tmp_path), "a")
    base = tiny_bert(seed=0, num_labels=2 if head else None).eval()
    adapted = ga.import_adapterhub(base, tmp_path).eval()
    spec = adapted.spec.adapters["a"]
    assert isinstance(spec, ga.VeraHub) and spec.magnitude == cfg.use_dora
    x = oracle_inputs("bert")
    with torch.no_grad():
        pick = (lambda o: o.logits) if head else (lambda o: o.last_hidden_state)
        want, got, plain = (pick(m(**x)) for m in (ah, adapted, base))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - plain).abs().max() > 5e-3 * plain.abs().max()   # the adapter does something (tiny logits)
    if not cfg.use_gating:            # it folds, exactly
        adapted.merge()
        with torch.no_grad():
            torch.testing.assert_close(pick(adapted(**x)), want, atol=ATOL, rtol=RTOL)


def test_bare_model_without_seed_is_a_clear_error(tmp_path):
    _ah(VeraConfig(r=2)).save_adapter(str(tmp_path), "a")
    with pytest.raises(CheckpointError, match="init_weights_seed"):
        ga.import_adapterhub(tiny_bert(seed=0), tmp_path)


@pytest.mark.parametrize("name", ["vera", "dvora"])
def test_presets(name):
    assert from_adapterhub_config(name) == from_adapterhub_config(adapters.AdapterConfig.load(name).to_dict())
