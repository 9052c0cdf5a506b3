"""Peak resident memory of this process, per phase (Linux; ``None`` elsewhere).

``PeakRSS.phase()`` resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5)
and reads ``VmHWM`` afterwards, so each phase gets its own exact peak. Where the reset
is not allowed, a thread samples ``VmRSS`` every few milliseconds instead (short spikes
between samples can be missed).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss() -> int | None:
    """Resident memory now, bytes."""
    return _status("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident bytes per named phase, and the resident bytes at the start."""

    def __init__(self) -> None:
        self.start = rss()
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.start is None:
            yield
            return
        sampler = None
        if not _reset_hwm():
            sampler = _Sampler()
            sampler.start()
        try:
            yield
        finally:
            if sampler is not None:
                sampler.stop()
                peak = sampler.peak
            else:
                peak = _status("VmHWM") or 0
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    @property
    def peak(self) -> int | None:
        return max(self.peaks.values(), default=None) if self.start is not None else None


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, rss() or 0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss() or 0)
