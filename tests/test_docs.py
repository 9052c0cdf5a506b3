"""Every ```python block in README.md and docs/*.md runs.

A file's blocks run in order in one namespace (a later block may use an earlier one's names), in a
temporary working directory. A block whose first line is ``# doc-test: skip (<reason>)`` is not run;
such blocks are counted and listed here (``SKIPPED``), so a new skip is a visible change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"#\s*doc-test:\s*skip\s*\((.+)\)")

#: (file, reason) of every skipped block; keep it short, with reasons that hold up.
_HUB = "AdapterHub `adapters` needs transformers 4.57: run by tests/oracle/test_docs_adapterhub.py"
SKIPPED = [
    ("docs/architecture.md", "a fragment of the built-in LoRA plugin; registering it again would clash"),
    ("docs/big-models.md", "needs bitsandbytes and a checkpoint; tests/test_quantized.py runs this path"),
    ("docs/migration-adapterhub.md", _HUB),
    ("docs/migration-adapterhub.md", _HUB),
    ("docs/migration-adapterhub.md", _HUB),
    ("docs/migration-adapterhub.md",
     "imports the checkpoint the AdapterHub block wrote: run by tests/oracle/test_docs_adapterhub.py"),
    ("docs/scale.md", "needs torchrun: tests/test_fsdp.py runs this path on 2 gloo ranks"),
]


def blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def _skip_reason(code: str) -> str | None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    m = SKIP.search(first)
    return m.group(1).strip() if m else None


def test_skips_are_few_and_listed():
    found = [(str(p.relative_to(ROOT)), r) for p in FILES for _, code in blocks(p)
             if (r := _skip_reason(code)) is not None]
    assert found == SKIPPED, f"skipped doc blocks changed: {found}"
    assert sum(len(blocks(p)) for p in FILES) >= 8  # the extraction itself works


@pytest.mark.parametrize("path", [p for p in FILES if any(_skip_reason(c) is None for _, c in blocks(p))],
                         ids=lambda p: p.name)
def test_doc_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"doc_{path.stem}"}
    ran = 0
    with torch.random.fork_rng(devices=[]):
        for line, code in blocks(path):
            if _skip_reason(code) is not None:
                continue
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), ns)
            except Exception as e:  # name the block: the traceback's file is "<doc>.md:<line>"
                raise AssertionError(f"{path.relative_to(ROOT)} block at line {line} failed: "
                                     f"{type(e).__name__}: {e}") from e
            ran += 1
    assert ran > 0


def test_mkdocs_site_builds_strict(tmp_path):
    """The documentation site (mkdocs.yml, Material theme, API reference from the docstrings) builds with
    ``--strict``: a broken link, a missing page in the nav or an unresolvable API object fails CI."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]'; ./dev installs it)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Capture <code>model</code> and insert the adapters" in api  # docstrings made it in
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert all(p.name in nav for p in (ROOT / "docs").glob("*.md")), "every docs page is in the nav"
