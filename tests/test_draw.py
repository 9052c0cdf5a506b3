"""Pictures: ``adapted.draw(FILE)`` and ``graphadapt inspect --svg FILE`` write SVG showing layers, roles,
inserted adapter nodes and the composition."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

import graphadapt as ga
from graphadapt.cli import main
from helpers import tiny_bert, tiny_t5

NS = "{http://www.w3.org/2000/svg}"


def _texts(path) -> list[str]:
    root = ET.parse(path).getroot()  # well-formed SVG
    assert root.tag == f"{NS}svg" and float(root.get("width")) > 0
    return [t.text or "" for t in root.iter(f"{NS}text")]


def test_adapted_model_picture(tmp_path):
    adapted = ga.apply(tiny_bert(num_labels=2), ga.Spec(
        {"lora": ga.LoRA(r=2, targets=("q", "v")), "bn": ga.SeqBn(reduction_factor=4),
         "bn2": ga.SeqBn(reduction_factor=8)}, active=ga.Stack("lora", ga.Parallel("bn", "bn2")),
        modules_to_save=["classifier"]))
    path = adapted.draw(tmp_path / "m.svg")
    texts = _texts(path)
    layers = adapted.structure_report["num_layers"]
    assert texts.count("q") == texts.count("down") == layers  # every layer's roles
    assert texts.count("+") == 2 * layers                       # both residuals of every layer
    for name in ("lora", "bn", "bn2"):                          # one badge per inserted node (+ the legend)
        sites = sum(1 for r in adapted.adapter_records if r.adapter == name)
        assert texts.count(name) == sites and sites > 0
    assert texts.count("Parallel(bn, bn2)") == layers           # the composition node at each site
    assert any("Stack('lora', Parallel('bn', 'bn2'))" in t for t in texts)
    assert any("trained whole (modules_to_save): classifier" in t for t in texts)
    with pytest.raises(ga.GraphAdaptError, match="ending in .svg"):
        adapted.draw(tmp_path / "m.png")


def test_inspect_svg(tmp_path, capsys):
    out = tmp_path / "t5.svg"
    assert main(["inspect", "--model", "tiny-t5", "--svg", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    texts = _texts(out)
    rep = ga.inspect(tiny_t5())
    assert texts.count("attn") == sum(1 + (L["cross_attention"] is not None) for L in rep["layers"])
    assert "cross attention" in texts and "encoder.block" in texts and "decoder.block" in texts
