"""The versioned structure signature (``graphadapt.structure.signature``) and checkpoints that record it.

- the signature is typed facts: rewording the inspect report or renaming a pattern does not change
  it; another layer count or hidden size does, and the difference is named;
- a checkpoint written before the signature existed (``tests/data/checkpoint_v0``, written by
  ``tests/data/make_legacy_checkpoint.py`` on the code of that time) still loads, with the outputs it
  gave then, and is still refused on another structure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graphadapt as ga
from graphadapt.capture import capture
from graphadapt.errors import CheckpointError
from graphadapt.writes import seal
from graphadapt.structure import recognize
from graphadapt.structure import report as report_module
from graphadapt.structure import signature as signature_module
from graphadapt.structure.report import structure_report
from graphadapt.structure.signature import SIGNATURE_VERSION, StructureSignature, structure_signature
from helpers import max_diff, text_inputs, tiny_bert

V0 = Path(__file__).parent / "data" / "checkpoint_v0"


@pytest.fixture(scope="module")
def bert_map():
    return recognize(capture(tiny_bert()))


def test_signature_ignores_report_wording_and_pattern_names(bert_map, monkeypatch):
    before = structure_report(bert_map)
    sig = before.signature
    assert sig.version == SIGNATURE_VERSION and sig.num_layers == 2
    monkeypatch.setattr(report_module, "_shape", lambda s: f"{s.in_features} to {s.out_features} channels")
    monkeypatch.setattr(report_module, "format_report", lambda rep: "reworded table")
    after = structure_report(bert_map)
    q = next(r for r in after["layers"][0]["sites"] if r["role"] == "q")
    assert q["shape"] == "32 to 32 channels" and str(after) == "reworded table"   # the wording did change
    assert after.signature == sig and after.signature.digest == sig.digest
    assert after.signature.v0_digest == sig.v0_digest          # the v0 form has its own frozen rendering

    old_names = {id(s): s.pattern for s in bert_map.role_sites()}
    try:
        for s in bert_map.role_sites():
            s.pattern = f"{s.pattern}_renamed"
        again = structure_signature(bert_map)
        assert again.digest == sig.digest                      # pattern names are not facts
        assert again.v0_digest != sig.v0_digest                # the v0 hash did include them ...
        names = {f"{p}_renamed": p for p in set(old_names.values())}
        monkeypatch.setattr(signature_module, "_V0_PATTERN_NAMES", names)
        assert structure_signature(bert_map).v0_digest == sig.v0_digest   # ... hence the rename table
    finally:
        for s in bert_map.role_sites():
            s.pattern = old_names[id(s)]


def test_signature_changes_with_structure_and_names_the_difference(bert_map):
    sig = structure_signature(bert_map)
    deeper = structure_signature(recognize(capture(tiny_bert(num_hidden_layers=3))))
    wider = structure_signature(recognize(capture(tiny_bert(hidden_size=64))))
    assert len({sig.digest, deeper.digest, wider.digest}) == 3
    assert sig.differences(deeper)[0] == "2 layer(s) vs 3"
    diff = sig.differences(wider)
    assert "layer 0 attention.q: in_features 32 vs 64, out_features 32 vs 64" in diff
    assert sig.differences(sig) == []
    # the record round-trips through JSON, identical layers stored once
    d = json.loads(json.dumps(sig.to_dict()))
    assert d["layers"] == [0, 0] and len(d["kinds"]) == 1
    assert StructureSignature.from_dict(d) == sig
    d["kinds"][0]["sites"]["attention.q"]["out"] = 33
    with pytest.raises(ValueError, match="digest"):
        StructureSignature.from_dict(d)
    with pytest.raises(ValueError, match="version 99"):
        StructureSignature.from_dict({**d, "version": 99})


def _base_and_spec():
    model = tiny_bert(num_labels=3)
    spec = ga.Spec({"lora": ga.LoRA(r=2), "bn": ga.SeqBn(reduction_factor=4)}, modules_to_save=["classifier"])
    return model, spec


def test_checkpoint_written_before_the_signature_loads_with_identical_outputs():
    spec_json = json.loads((V0 / "spec.json").read_text())
    assert "structure_signature" not in spec_json and len(spec_json["structure_fingerprint"]) == 64
    x = text_inputs()
    loaded = ga.from_pretrained(tiny_bert(num_labels=3), V0).eval()
    # reference: the same spec applied, the saved tensors copied in directly (no checkpoint code)
    model, spec = _base_and_spec()
    ref = ga.apply(model, spec).eval()
    missing, unexpected = ref.load_state_dict(load_file(str(V0 / "adapters.safetensors")), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("adapters.")]
    with torch.no_grad():
        got, want, base = loaded(**x).logits, ref(**x).logits, tiny_bert(num_labels=3).eval()(**x).logits
    assert torch.equal(got, want)
    assert max_diff(got, load_file(str(V0 / "expected_logits.safetensors"))["logits"]) < 1e-6  # as written then
    assert max_diff(got, base) > 1e-3                                   # the adapters do act


def test_checkpoint_written_before_the_signature_is_refused_on_another_structure(tmp_path):
    with pytest.raises(CheckpointError, match=r"structure differs .*2 layer\(s\) vs 3"):
        ga.from_pretrained(tiny_bert(num_labels=3, num_hidden_layers=3), V0)


def test_new_checkpoint_records_the_signature_and_names_what_differs(tmp_path):
    model, spec = _base_and_spec()
    adapted = ga.apply(model, spec)
    adapted.save_pretrained(tmp_path / "new")
    for f in ("spec.json", "adapter_config.json"):
        rec = json.loads((tmp_path / "new" / f).read_text())
        assert rec["structure_signature"] == adapted.structure_report.signature.to_dict()
        # older readers compare the v0 form: the same value today's code writes for this model
        assert rec["structure_fingerprint"] == json.loads((V0 / f).read_text())["structure_fingerprint"]
    with pytest.raises(CheckpointError, match=r"structure differs .*layer 0 attention\.q: in_features 32 vs 48"):
        ga.from_pretrained(tiny_bert(num_labels=3, hidden_size=48), tmp_path / "new")
    # a hand-edited record is refused as such, not compared
    shutil.copytree(tmp_path / "new", tmp_path / "future")
    p = tmp_path / "future" / "spec.json"
    rec = json.loads(p.read_text())
    rec["structure_signature"]["kinds"][0]["heads"] = 8
    p.write_text(json.dumps(seal(rec)))  # re-sealed: the signature's own check is tested
    with pytest.raises(CheckpointError, match="unreadable structure_signature .*digest"):
        ga.load(tiny_bert(num_labels=3), tmp_path / "future")
    rec["structure_signature"]["kinds"][0]["heads"] = 4
    # a signature version this graphadapt does not read: the v0 fingerprint decides; without it, a clear error
    rec["structure_signature"]["version"] = 99
    p.write_text(json.dumps(seal(rec)))  # re-sealed: the signature's own check is tested
    ga.load(tiny_bert(num_labels=3), tmp_path / "future")
    del rec["structure_fingerprint"]
    p.write_text(json.dumps(seal(rec)))  # re-sealed: the signature's own check is tested
    with pytest.raises(CheckpointError, match="signature version 99.*upgrade graphadapt"):
        ga.load(tiny_bert(num_labels=3), tmp_path / "future")
