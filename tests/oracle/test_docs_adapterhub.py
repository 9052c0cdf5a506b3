"""docs/migration-adapterhub.md, every block (the AdapterHub ones included, which the main suite skips)
in order, in the oracle environment: the side-by-side code runs and the import equals AdapterHub."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "migration-adapterhub.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def test_migration_page_runs_with_adapterhub(tmp_path, monkeypatch):
    pytest.importorskip("adapters")
    monkeypatch.chdir(tmp_path)
    text = DOC.read_text(encoding="utf-8")
    ns: dict = {"__name__": "doc_migration_adapterhub"}
    ran = 0
    with torch.random.fork_rng(devices=[]):
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            exec(compile(m.group(1), f"{DOC.name}:{line}", "exec"), ns)
            ran += 1
    assert ran == 7 and "imported" in ns and "hub_out" in ns  # the import-equals-AdapterHub block ran
