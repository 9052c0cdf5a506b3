"""``python -m graphadapt`` runs the CLI: its help, and its exit status on an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "graphadapt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_python_m_graphadapt_help():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: graphadapt") and "inspect" in r.stdout


def test_python_m_graphadapt_exit_status_is_mains():
    r = _run("inspect", "--model", "no-such-model")
    assert r.returncode == 1 and "neither a known name" in r.stderr
