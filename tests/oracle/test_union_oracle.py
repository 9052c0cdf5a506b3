"""Unions (MAM, UniPELT) against AdapterHub ``adapters`` 1.3.0 (oracle venv), through ``import_adapterhub`` and
by copying weights into ``graphadapt.apply``'s modules. Every AdapterHub tensor non-zero random; eval mode,
padded inputs, fp32 1e-5; outputs must differ from the base model's."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import MAMConfig, UniPELTConfig

import graphadapt as ga
from graphadapt.methods import get_method
from graphadapt.methods.bottleneck.module import load_adapterhub_state_dict
from adapterhub_helpers import oracle_inputs, randomize_adapterhub
from helpers import tiny_bert

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


def _ah(cfg, name="u"):
    m = tiny_bert(seed=0)
    adapters.init(m)
    m.add_adapter(name, config=cfg)
    randomize_adapterhub(m, name, seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if any(f"{w}.{name}." in pname for w in ("prefix_tunings", "prefix_gates", "loras")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    assert all((p != 0).all() for n, p in m.named_parameters() if f".{name}." in n)
    m.set_active_adapters(name)
    return m.eval()


def _out(m, x):
    with torch.no_grad():
        return m(**x).last_hidden_state


def _copy(ah, adapted, name="u"):
    """AdapterHub tensors → graphadapt modules by name (prefix pool/gates, LoRA, bottleneck sites)."""
    ours = dict(adapted.named_parameters())
    sites: dict[str, dict] = {}
    with torch.no_grad():
        for k, v in ah.named_parameters():
            if f"prefix_tunings.{name}." in k:
                ours[f"adapters.{name}.prefix_tuning.prefix.generators." + k.split(f"prefix_tunings.{name}.")[1]].copy_(v)
            elif f"prefix_gates.{name}." in k:
                layer = k.split("encoder.layer.")[1].split(".")[0]
                ours[f"adapters.{name}.prefix_tuning.encoder.layer.{layer}.self_prefix.gate.{k.rsplit('.', 1)[1]}"].copy_(v)
            elif f".loras.{name}." in k:
                path, rest = k.split(f".loras.{name}.")
                ours[f"adapters.{name}.lora.{path}.{rest}"].copy_(v)
            elif f".adapters.{name}." in k:
                path, rest = k.split(f".adapters.{name}.")
                sites.setdefault(path, {})[rest] = v
    for path, tensors in sites.items():
        layer, pos = path.split("encoder.layer.")[1].split(".", 1)
        where = "mh_adapter" if pos == "attention.output" else "output_adapter"
        load_adapterhub_state_dict(adapted.get_submodule(f"adapters.{name}.bottleneck.encoder.layer.{layer}.{where}"),
                                   tensors, strict=True)


@pytest.mark.parametrize("preset", ["mam", "unipelt"])
def test_union_weight_copy_matches_adapterhub(preset):
    cfg, spec = {"mam": (MAMConfig(), ga.MAM()), "unipelt": (UniPELTConfig(), ga.UniPELT())}[preset]
    ah = _ah(cfg)
    adapted = ga.apply(tiny_bert(seed=0), ga.Spec({"u": spec})).eval()
    _copy(ah, adapted)
    x = oracle_inputs("bert")
    got = _out(adapted, x)
    torch.testing.assert_close(got, _out(ah, x), atol=ATOL, rtol=RTOL)
    assert (got - _out(tiny_bert(seed=0), x)).abs().max() > 1e-2


def test_mam_import_matches_adapterhub(tmp_path):
    ah = _ah(MAMConfig())
    ah.save_adapter(str(tmp_path), "u")
    base = tiny_bert(seed=0)
    adapted = ga.import_adapterhub(base, tmp_path).eval()
    assert adapted.spec.adapters["u"] == ga.MAM()
    x = oracle_inputs("bert")
    got = _out(adapted, x)
    torch.testing.assert_close(got, _out(ah, x), atol=ATOL, rtol=RTOL)
    assert (got - _out(base, x)).abs().max() > 1e-2


def test_unipelt_import_matches_adapterhub(tmp_path):
    assert get_method("lora").adapterhub_architectures  # the LoRA member's reader exists: this test must run
    ah = _ah(UniPELTConfig())
    ah.save_adapter(str(tmp_path), "u")
    adapted = ga.import_adapterhub(tiny_bert(seed=0), tmp_path).eval()
    assert adapted.spec.adapters["u"] == ga.UniPELT()
    x = oracle_inputs("bert")
    torch.testing.assert_close(_out(adapted, x), _out(ah, x), atol=ATOL, rtol=RTOL)
