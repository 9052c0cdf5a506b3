"""Suite-wide test setup: the program cache (graphadapt/program_cache.py) lives in a temporary directory.

A test run never writes into the user's ``~/.cache``: ``GRAPHADAPT_CACHE`` points at a directory made for this
process (inherited by the CLI subprocesses tests start) and removed at exit. Tests of the cache itself point it
at their own ``tmp_path``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="graphadapt-programs-")
os.environ["GRAPHADAPT_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
