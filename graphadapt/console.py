"""Console helpers shared by the CLI and the demo: exit codes, staged progress lines, and the text
that says what an adapted model is (``repr(adapted)``, the notes under ``adapted.summary()``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

#: Exit codes of the ``graphadapt`` command (``graphadapt --help`` lists them).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + 2  # the shell's status for SIGINT (Ctrl-C)
EXIT_TERMINATED = 128 + 15  # ... and for SIGTERM

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "a graphadapt error (bad input, unreadable model or checkpoint, capture/export failure); "
                "the message says what and how to fix it",
    EXIT_USAGE: "bad command-line usage (unknown flag, missing argument)",
    EXIT_VERIFY: "the ONNX file disagrees with PyTorch beyond the tolerances (verification failed)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); files being written were left as before",
    EXIT_TERMINATED: "terminated (SIGTERM); files being written were left as before",
}


class Progress:
    """Prints ``[i/n] stage … done (t s)`` lines (nothing when ``quiet``); :meth:`tick` reports steps
    inside a long stage (rewritten in place on a terminal, at each quarter otherwise)."""

    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.total, self.n, self.quiet = total, 0, quiet
        self.stream = stream
        self._label = ""
        self._shown = -1

    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    @contextmanager
    def stage(self, name: str, heartbeat: float | None = None):
        """One stage line; with ``heartbeat`` (seconds), the elapsed time is shown every ``heartbeat``
        seconds while the stage runs (an export or a verification that takes minutes)."""
        import threading

        self.n += 1
        self._label, self._shown = f"[{self.n}/{self.total}] {name} …", -1
        out = self._out()
        if not self.quiet:
            print(self._label, end="", flush=True, file=out)
        t = time.perf_counter()
        stop = threading.Event()
        beat = None
        if heartbeat and not self.quiet:
            tty = getattr(out, "isatty", lambda: False)()

            def run():
                while not stop.wait(heartbeat):
                    elapsed = time.perf_counter() - t
                    print(f"\r{self._label} {elapsed:.0f} s" if tty else f" {elapsed:.0f} s", end="", flush=True,
                          file=out)

            beat = threading.Thread(target=run, daemon=True, name="graphadapt-progress")
            beat.start()
        try:
            yield self
        except BaseException:
            stop.set()
            if beat is not None:
                beat.join()
            if not self.quiet:
                print(" failed", flush=True, file=out)
            raise
        stop.set()
        if beat is not None:
            beat.join()
        if not self.quiet:
            print(f" done ({time.perf_counter() - t:.1f} s)", flush=True, file=out)

    def tick(self, i: int, n: int, note: str = "") -> None:
        """Step ``i`` of ``n`` (1-based) of the current stage, with a short ``note`` (a loss)."""
        if self.quiet or n <= 0:
            return
        out = self._out()
        if getattr(out, "isatty", lambda: False)():
            print(f"\r{self._label} {i}/{n} {note}".rstrip() + "   ", end="", flush=True, file=out)
            if i == n:
                print(f"\r{self._label}", end="", flush=True, file=out)
            return
        quarter = 4 * i // n
        if quarter > self._shown and quarter > 0 and i < n:
            self._shown = quarter
            print(f" {i}/{n}" + (f" ({note})" if note else ""), end="", flush=True, file=out)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 10**6 else f"{n:,}"


def short_repr(method) -> str:
    """``Method(r=2)``: a method spec with only the fields that differ from their defaults."""
    import dataclasses

    if not dataclasses.is_dataclass(method):
        return repr(method)
    parts = []
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        if v != default:
            parts.append(f"{f.name}={v!r}")
    return f"{type(method).__name__}({', '.join(parts)})"


def describe(adapted) -> str:
    """What an adapted model is, in a few lines (``repr(adapted)``): the base, each adapter with its
    method, sites and size, what is active, what trains, and whether it is merged."""
    spec = adapted.spec
    base = adapted.base_parameter_count()
    src = getattr(adapted, "source_class", "model").rsplit(".", 1)[-1]
    lines = [f"AdaptedModel of {src} ({_count(base)} base parameters, frozen; graphadapt)"]
    active = set(adapted.active_adapters())
    for name, method in spec.adapters.items():
        sites = [r.target for r in adapted.adapter_records if r.adapter == name]
        n = adapted.adapter_parameter_count(name)
        lines.append(f"  {name}: {short_repr(method)}"[:200])
        lines.append(f"      {len(sites)} site(s), {_count(n)} parameters ({100 * n / max(base, 1):.3f} % of the "
                     f"base), {'active' if name in active else 'inactive'}")
    if spec.composition is not None:
        lines.append(f"  composition: {spec.composition!r}")
    heads = list(spec.modules_to_save)
    if heads:
        lines.append(f"  trained whole (modules_to_save): {', '.join(heads)}"
                     + (f"  [task_type {spec.task_type}]" if spec.task_type else ""))
    elif spec.task_type:
        lines.append(f"  task_type {spec.task_type} (no head of that task in this model)")
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    lines.append(f"  trainable: {_count(trainable)} parameters; merged: {'yes' if adapted.is_merged else 'no'}"
                 f"; {'training' if adapted.training else 'eval'} mode")
    lines.append("  adapted.summary() for the table, adapted.draw('model.svg') for a picture, "
                 "print(adapted.code) for the graph")
    return "\n".join(lines)


def summary_notes(adapted) -> list[str]:
    """Lines under ``adapted.summary()``'s table: heads trained whole, the composition, the task type."""
    spec = adapted.spec
    notes = []
    if spec.modules_to_save:
        notes.append(f"trained whole (modules_to_save): {', '.join(spec.modules_to_save)}"
                     + (f" (task_type {spec.task_type})" if spec.task_type else ""))
    if spec.composition is not None:
        notes.append(f"composition: {spec.composition!r}")
    return notes


__all__ = ["EXIT_CODES", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE",
           "EXIT_VERIFY", "Progress", "describe", "short_repr", "summary_notes"]
