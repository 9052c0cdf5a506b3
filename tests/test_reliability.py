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


# --------------------------------------------------------------------------- 2. thread safety
def _in_threads(fns):
    """Run every fn in its own thread, started together; returns (results, errors)."""
    import threading

    results, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results, errors


def test_apply_from_two_threads_same_and_different_models():
    from helpers import max_diff, randomize_lora, run_no_grad, text_inputs, tiny_bert

    a, b = tiny_bert(), tiny_bert(seed=1)
    a.train()  # a caller in train mode must stay there
    spec = ga.LoRA(r=2, alpha=4, init="gaussian")
    results, errors = _in_threads([lambda: ga.apply(a, spec), lambda: ga.apply(a, spec),
                                   lambda: ga.apply(b, spec)])
    assert errors == []
    assert a.training and not b.training
    assert results[0].training and results[1].training and not results[2].training
    ref = ga.apply(b, spec).eval()
    for m in (*results, ref):
        randomize_lora(m)  # the same non-zero adapter weights everywhere: graphs must agree
    x = text_inputs(2, 5)
    assert max_diff(run_no_grad(results[2].eval(), x), run_no_grad(ref, x)) == 0.0
    assert max_diff(run_no_grad(results[2], x), run_no_grad(b, x)) > 1e-3  # the adapter is live
    assert max_diff(run_no_grad(results[0].eval(), x), run_no_grad(results[1].eval(), x)) == 0.0


def test_merge_and_export_from_two_threads(tmp_path):
    from helpers import max_diff, randomize_lora, run_no_grad, text_inputs, tiny_bert

    spec = ga.LoRA(r=2, alpha=4)
    m1, m2 = ga.apply(tiny_bert(), spec), ga.apply(tiny_bert(seed=1), spec)
    randomize_lora(m1), randomize_lora(m2, seed=1)
    x = text_inputs(2, 5)
    before = [run_no_grad(m, x) for m in (m1, m2)]
    _, errors = _in_threads([m1.merge, m2.merge])
    assert errors == [] and m1.is_merged and m2.is_merged
    assert max(max_diff(run_no_grad(m, x), b) for m, b in zip((m1, m2), before)) < 1e-5
    _, errors = _in_threads([m1.unmerge, m2.unmerge])
    assert errors == [] and not m1.is_merged and not m2.is_merged
    assert max(max_diff(run_no_grad(m, x), b) for m, b in zip((m1, m2), before)) == 0.0
    toy = Toy()
    reports, errors = _in_threads([lambda: export_onnx(toy, tmp_path / "a.onnx", example_inputs=toy_inputs()),
                                   lambda: export_onnx(toy, tmp_path / "b.onnx", example_inputs=toy_inputs())])
    assert errors == [] and all(r.verified for r in reports)
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx"]
