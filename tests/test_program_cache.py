"""The on-disk program cache (graphadapt/program_cache.py): a second capture of a known model loads the program.

Every test points ``GRAPHADAPT_CACHE`` at its own tmp directory and counts traces (``stats["traced"]``).
"""

from __future__ import annotations

import json

import pytest
import torch

import graphadapt as ga
from graphadapt import program_cache as pc
from graphadapt.capture import capture

from helpers import randomize_lora, text_inputs, tiny_bert


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "programs"
    monkeypatch.setenv(pc.ENV, str(root))
    pc.stats.clear()
    return root


def _entries(root):
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.exists() else []


def _run(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state


def test_second_apply_loads_the_program_and_computes_the_same(cache):
    m, x = tiny_bert(), text_inputs()
    a1 = ga.apply(m, ga.LoRA(r=4))
    assert pc.stats["traced"] == 1 and pc.stats["stored"] == 1 and len(_entries(cache)) == 1
    a2 = ga.apply(m, ga.LoRA(r=4))
    assert pc.stats["traced"] == 1 and pc.stats["hit"] == 1
    fresh = ga.apply(m, ga.LoRA(r=4), program_cache=False)
    assert pc.stats["traced"] == 2 and len(_entries(cache)) == 1  # opted out: traced, nothing stored
    for a in (a1, a2, fresh):
        randomize_lora(a, seed=3)
    assert a2.code == fresh.code
    out = _run(fresh, x)
    assert torch.equal(_run(a2, x), out) and torch.equal(_run(a1, x), out)
    assert not torch.allclose(out, _run(m, x))  # the adapter does something
    # the loaded program computes with the model's own weights (shared storage), never stored copies
    own = dict(m.named_parameters())
    assert all(p.data_ptr() == own[n].data_ptr() for n, p in a2.named_parameters() if n in own)
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_weights_changed_after_storing_are_used(cache):
    m, x = tiny_bert(), text_inputs()
    capture(m)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    gm = capture(m)
    assert pc.stats["hit"] == 1
    assert torch.allclose(_run(gm, x), _run(m, x), atol=1e-5)


def test_structure_report_equal_from_cache(cache):
    m = tiny_bert()
    traced = ga.inspect(m)
    loaded = ga.inspect(m)
    assert pc.stats["hit"] == 1 and pc.stats["traced"] == 1
    assert loaded == traced


@pytest.mark.parametrize("damage", ["program", "checksum", "key"])
def test_damaged_entry_is_traced_again_and_rewritten(cache, damage):
    m, x = tiny_bert(), text_inputs()
    capture(m)
    entry, = _entries(cache)
    if damage == "program":  # a truncated file (its hash no longer matches)
        data = (entry / "program.pt2").read_bytes()
        (entry / "program.pt2").write_bytes(data[: len(data) // 2])
    else:  # an edited meta: a wrong hash, or the key text of another model
        meta = json.loads((entry / "meta.json").read_text())
        if damage == "checksum":
            meta["sha256"] = "0" * 64
        else:
            meta["key_text"] = meta["key_text"].replace('"layer_norm_eps":1e-12', '"layer_norm_eps":1e-06')
        (entry / "meta.json").write_text(json.dumps(meta))
    gm = capture(m)
    assert pc.stats["rejected"] == 1 and pc.stats["traced"] == 2
    assert torch.allclose(_run(gm, x), _run(m, x), atol=1e-6)
    capture(m)  # the entry was rewritten
    assert pc.stats["hit"] == 1 and pc.stats["traced"] == 2


def test_payload_that_is_not_a_program_is_refused(cache):
    """A forged entry (valid hash over a pickle that builds something else) is not unpickled into objects."""
    import hashlib
    import pickle

    m = tiny_bert()
    capture(m)
    entry, = _entries(cache)
    data = pickle.dumps({"program": print})
    (entry / "program.pt2").write_bytes(data)
    meta = json.loads((entry / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (entry / "meta.json").write_text(json.dumps(meta))
    capture(m)
    assert pc.stats["rejected"] == 1 and pc.stats["traced"] == 2


def test_another_config_or_input_misses_another_spec_hits(cache):
    x = text_inputs()
    capture(tiny_bert())
    capture(tiny_bert(layer_norm_eps=1e-6))  # same shapes, another constant in the graph
    assert pc.stats["traced"] == 2 and pc.stats["hit"] == 0
    capture(tiny_bert(), example_kwargs={"input_ids": x["input_ids"]})  # other inputs
    assert pc.stats["traced"] == 3 and len(_entries(cache)) == 3
    m = tiny_bert()
    a = ga.apply(m, ga.LoRA(r=2, targets=("q", "v")))  # the program is the base model's: every spec shares it
    b = ga.apply(m, ga.LoRA(r=2, targets=("q", "v")), program_cache=False)
    assert pc.stats["hit"] == 1
    randomize_lora(a, seed=1)
    randomize_lora(b, seed=1)
    assert torch.equal(_run(a, x), _run(b, x))


def test_opt_out_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(pc.ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    pc.stats.clear()
    m = tiny_bert()
    capture(m)
    capture(m)
    assert pc.stats["traced"] == 2 and not pc.stats["stored"] and not list(tmp_path.iterdir())
    assert pc.cache_root() is None and pc.cache_root(True) is None   # off wins over a per-call True
    monkeypatch.delenv(pc.ENV)
    assert pc.cache_root() is None                                   # opt-in: nothing written unless asked
    capture(m)
    assert not list(tmp_path.iterdir())
    assert pc.cache_root(True) == tmp_path / "graphadapt" / "programs"


def test_models_it_cannot_describe_are_not_cached(cache):
    m = tiny_bert()
    handle = m.encoder.register_forward_pre_hook(lambda mod, args: None)
    capture(m)
    capture(m)
    handle.remove()
    assert pc.stats["uncacheable"] == 2 and pc.stats["traced"] == 2 and not _entries(cache)


def test_clear_and_leftovers(cache):
    m = tiny_bert()
    capture(m)
    (cache / ".tmp-crashed").mkdir()  # a writer that died mid-write
    capture(m)
    assert pc.stats["hit"] == 1
    assert pc.clear() == 2 and not list(cache.iterdir())


def test_bad_flag():
    with pytest.raises(ga.errors.CaptureError, match="program_cache"):
        capture(tiny_bert(), program_cache="yes")


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).relu()


def test_writer_that_loses_the_race_keeps_the_entry_in_place(cache, monkeypatch):
    """Two writers of one entry: the second rename fails (the first is in place); its copy is dropped, the
    entry stays valid. A model without a config (its class from this file) is cached too."""
    import os

    m, x = _Small(), {"x": torch.randn(2, 4)}
    capture(m, example_kwargs=x)
    assert pc.stats["stored"] == 1
    entry, = _entries(cache)
    before = (entry / "program.pt2").read_bytes()

    def lost(src, dst):
        raise OSError("directory not empty")

    ep = torch.export.export(m, (), x)
    key, text = pc.program_key(m, x, {})
    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", lost)
        assert pc.store_program(cache, key, text, ep, m) is False
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert (entry / "program.pt2").read_bytes() == before
    gm = capture(m, example_kwargs=x)
    assert pc.stats["hit"] == 1 and torch.equal(gm(**x), m(**x))
