"""A merged model cannot be trained silently: an optimizer step over folded adapter parameters is refused.

``merge()`` folds adapters into the base weights; the folded adapter modules no longer run, so their
parameters get no gradient and an optimizer built before the merge would "step" with no effect
(``train() → merge() → optimizer.step()`` trains nothing). ``merge`` marks those parameters and a
global optimizer step pre-hook (installed on the first merge, one attribute read per parameter)
raises :class:`~graphadapt.errors.MergeError` naming one of them; ``unmerge`` clears the marks.
"""

from __future__ import annotations

import threading

from .errors import MergeError

_MARK = "_graphadapt_folded"
_installed = False
_guard = threading.Lock()


def _step_pre_hook(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = getattr(p, _MARK, None)
            if name is not None:
                raise MergeError(
                    f"optimizer.step() over adapter parameter {name!r} of a merged model: merge() folded that "
                    "adapter into the base weights, so it no longer runs and training would change nothing. "
                    "Call unmerge() before training (train, then merge), or build the optimizer over the "
                    "parameters that still train.")


def mark_folded(named_params, folded: bool = True) -> None:
    """Mark (or unmark) ``(name, parameter)`` pairs as folded into the base by a merge."""
    global _installed
    if folded and not _installed:
        with _guard:
            if not _installed:
                from torch.optim.optimizer import register_optimizer_step_pre_hook

                register_optimizer_step_pre_hook(_step_pre_hook)
                _installed = True
    for name, p in named_params:
        if folded:
            setattr(p, _MARK, name)
        elif hasattr(p, _MARK):
            delattr(p, _MARK)


__all__ = ["mark_folded"]
