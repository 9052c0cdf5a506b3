"""Reliability: hostile inputs and faults end in a clear graphadapt error, never in lost data,
silent wrong numbers or a raw traceback (issue #13). docs/reliability.md lists every case."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import graphadapt as ga
from graphadapt.errors import ExportError
from graphadapt.exporters import export_onnx, export_triton, verify_onnx


class Toy(nn.Module):
    """Embedding + linear, exported in well under a second."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, dim)
            self.proj = nn.Linear(dim, 5)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return {"hidden": h, "logits": self.proj(h)}


def toy_inputs(batch=2, seq=6):
    ids = torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def tree(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to prove nothing changed)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# --------------------------------------------------------------------------- 1. paths stay inside the target
@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", ".hidden", "-rf", "", "a\\b", "x\x00y",
                                  "é", "a" * 256])
def test_triton_name_cannot_escape_the_repository(tmp_path, name):
    outer = tmp_path / "outer"
    (outer / "1").mkdir(parents=True)
    (outer / "1" / "precious.txt").write_text("keep me")
    before = tree(tmp_path)
    with pytest.raises(ExportError, match="model name"):
        export_triton(Toy(), outer / "repo", name, example_inputs=toy_inputs())
    assert tree(tmp_path) == before


def test_triton_symlinked_model_dir_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "1").mkdir(parents=True)
    (elsewhere / "1" / "precious.txt").write_text("keep me")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m").symlink_to(elsewhere)
    with pytest.raises(ExportError, match="outside the repository"):
        export_triton(Toy(), repo, "m", example_inputs=toy_inputs())
    assert (elsewhere / "1" / "precious.txt").read_text() == "keep me"


def test_cli_triton_name_dotdot_refused_before_loading(tmp_path, capsys):
    from graphadapt.cli import main

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "precious.txt").write_text("keep me")
    rc = main(["export", "--model", "tiny-bert", "--spec", "nonexistent.yaml", "--triton",
               str(tmp_path / "repo"), "--name", ".."])
    assert rc != 0 and "model name" in capsys.readouterr().err
    assert (tmp_path / "1" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "repo").exists()
