"""Oracle-venv test setup: make ``graphadapt`` (repo root) and ``helpers`` (``tests/``) importable.

The oracle venv (transformers 4.57, AdapterHub ``adapters`` 1.3.0) does not install graphadapt; tests here
import it from the working tree.
"""

from __future__ import annotations

import pathlib
import sys

_TESTS = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
