"""The capability table of docs/methods.md names real tests: every `tests/<file>.py::<test>` in it is a file with that
test function (a renamed or deleted test fails here instead of leaving a stale ✓)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)")


def test_capability_table_names_existing_tests():
    text = (ROOT / "docs" / "methods.md").read_text()
    table = text[text.index("## Capabilities at a glance"):text.index("\n## ", text.index("## Capabilities"))]
    refs = REF.findall(table)
    assert len(refs) > 100   # the table was found and parsed
    missing = sorted({f"{f}::{t}" for f, t in refs
                      if not (ROOT / f).is_file() or not re.search(rf"^def {t}\(", (ROOT / f).read_text(), re.M)})
    assert not missing, f"docs/methods.md names tests that do not exist: {missing}"
