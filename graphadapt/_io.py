"""File-system safety shared by every writer: writability probes and signal-safe temp work.

``check_writable(dir)`` creates and removes a probe file (``os.access`` lies for root and
read-only mounts), so an export under an unwritable directory fails before seconds of work.
``signals_as_exceptions()`` turns SIGTERM into :class:`Terminated` for the duration of a
write, so ``finally`` blocks remove temp files exactly as they do for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM arrived during a write (a ``BaseException``, like ``KeyboardInterrupt``)."""


def check_writable(directory: str | os.PathLike, error: type[Exception], what: str = "directory") -> None:
    """Raise ``error`` unless a file can be created in ``directory`` (probe file, then removed)."""
    d = Path(directory)
    try:
        fd, probe = tempfile.mkstemp(prefix=".graphadapt-probe-", dir=d)
    except OSError as e:
        why = "is full" if e.errno == errno.ENOSPC else "is read-only" if e.errno == errno.EROFS else \
            "is not writable" if e.errno in (errno.EACCES, errno.EPERM) else f"cannot be written ({e.strerror})"
        raise error(f"{what} {d} {why}; choose another location") from e
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (so cleanup runs).

    A no-op outside the main thread (Python only delivers signals there) or when the
    process ignores SIGTERM. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum} during a write; temporary files were removed")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
