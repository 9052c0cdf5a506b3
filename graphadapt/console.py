"""Console helpers shared by the CLI and the demo: exit codes and staged progress lines."""

from __future__ import annotations

import time
from contextlib import contextmanager

EXIT_OK, EXIT_ERROR, EXIT_VERIFY = 0, 1, 3


class Progress:
    """Prints ``[i/n] stage … done (t s)`` lines (nothing when ``quiet``)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.n, self.quiet = total, 0, quiet

    @contextmanager
    def stage(self, name: str):
        self.n += 1
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {name} …", end="", flush=True)
        t = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - t:.1f} s)", flush=True)


__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_VERIFY", "Progress"]
