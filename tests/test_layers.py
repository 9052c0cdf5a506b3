"""The package's layering contract (pyproject.toml [tool.importlinter]) holds, and it can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is in the dev extras")


def _lint(pkg_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pkg_parent)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=pkg_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_layers_and_no_cycles_hold():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "graphadapt layers KEPT" in res.stdout and "no import cycles between modules KEPT" in res.stdout


@pytest.mark.parametrize("module,line,broken", [
    # a lower layer reaching up (the old hidden cycle model → checkpoints → api → model)
    ("checkpoints/__init__.py", "from ..api import apply as _apply  # injected\n", "graphadapt layers BROKEN"),
    # a cycle between siblings hidden inside a function
    ("zoo.py", "def _f():\n    from .cli import main  # injected\n", "no import cycles between modules BROKEN"),
])
def test_contract_fails_on_a_violation(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "graphadapt", tmp_path / "graphadapt", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "graphadapt" / module, "a") as f:
        f.write("\n" + line)
    res = _lint(tmp_path)
    assert res.returncode != 0 and broken in res.stdout, res.stdout
