"""examples/finetune_minilm.py runs end to end (seeded tiny BERT, 2 steps, no export: the plumbing only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_finetune_example_smoke(capsys):
    spec = importlib.util.spec_from_file_location("finetune_minilm", ROOT / "examples" / "finetune_minilm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "tiny", "--steps", "2", "--no-export"]) == 0
    out = capsys.readouterr().out
    assert "192 training / 96 test sentences, 4 topics" in out
    assert out.count("same predictions True") == 2
    assert "lora " in out and "12 folded" not in out and "4 folded, 0 kept" in out  # tiny: 2 layers x q, v
    assert "seqbn " in out and "0 folded, 2 kept" in out


def test_shipped_data_is_labelled_and_split():
    rows = {name: [json.loads(line) for line in (ROOT / "examples" / "data" / name).read_text().splitlines()]
            for name in ("topics_train.jsonl", "topics_test.jsonl")}
    train, test = rows["topics_train.jsonl"], rows["topics_test.jsonl"]
    assert len(train) == 192 and len(test) == 96
    assert {r["label"] for r in train} == {r["label"] for r in test} == {0, 1, 2, 3}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
