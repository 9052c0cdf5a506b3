"""Consistency under concurrency: a forward sees the model's state before or after a change, never a mix.

Each :class:`~graphadapt.model.AdaptedModel` has one reader–writer lock (created on first use, kept
out of the module's state so copies and pickles get their own):

* **readers** — a forward of the captured graph (``model(**inputs)``) holds it shared; many
  forwards run at once;
* **writers** — ``set_active``, ``add_adapter``/``delete_adapter``, ``merge``/``unmerge``,
  ``load_adapters``, the flips of ``disable_adapters()`` (entering and leaving), hold it exclusively:
  they wait for running forwards to finish, and forwards that start meanwhile wait for them.

Writers are preferred (a stream of forwards cannot starve a ``set_active``). Both are re-entrant per
thread, and a writer's own forwards pass (``to_base_model`` merges and reads under one write).
Lock order: writers already hold ``capture.GRAPH_LOCK`` (they are ``@serialised``) when they take the
write lock, and a forward never takes ``GRAPH_LOCK`` while it holds the read lock (a call that
needs a new capture — another signature — is routed outside it), so the two locks cannot deadlock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

__all__ = ["StateLock", "state_lock", "reading", "exclusive"]


class StateLock:
    """A re-entrant, writer-preferring reader–writer lock."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}   # thread id -> depth
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                n = self._readers[me] - 1
                if n:
                    self._readers[me] = n
                else:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                self._waiting_writers += 1
                try:
                    # a thread that reads and then writes (a forward hook calling set_active) would wait for
                    # itself: its own read does not count
                    while self._writer is not None or any(t != me for t in self._readers):
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def state_lock(model) -> StateLock:
    lock = _LOCKS.get(model)
    if lock is None:
        with _LOCKS_GUARD:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = StateLock()
    return lock


def reading(model):
    """Context manager: ``model``'s state does not change inside it (a forward)."""
    return state_lock(model).read()


def exclusive(fn):
    """Method decorator: the method changes the model's state with no forward running."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with state_lock(self).write():
            return fn(self, *args, **kwargs)
    return wrapper
