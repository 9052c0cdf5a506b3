"""AdapterHub's ``MultiTask`` block (``MultiTask("t0", "t1", …)``): rows routed to their task's adapter by ``task_ids``.

before: ``Spec(active=MultiTask("t0", "t1"))`` — adapters ``t0``, ``t1`` built at their sites, not wired
after:  one more graph input ``task_ids`` (int64 ``[batch]``; ``i`` = the MultiTask's ``i``-th adapter)
        linear site   ``y' = call_module(adapters._compose.<site>)(x, y, W, b, task_ids)``
        residual site ``out = call_module(adapters._compose.<site>)(h, r, LN.w, LN.b, task_ids)``

AdapterHub (``ComposableAdapterLayerBase.compose_multi_task``) sorts the rows by task id, runs a ``BatchSplit``
with the per-task counts and restores the row order: row ``j`` goes through ``children[task_ids[j]]`` only, every
child on its own rows. That is per-row selection, so the evaluation is :mod:`graphadapt.composition.route`'s
(stacked low-rank terms gathered by row where every adapter has a ``RoutedForm``, else each adapter on the batch
and ``torch.where`` per row) under MultiTask's own contract: the input is ``task_ids``, there is no base-model id
(AdapterHub has none; an id outside ``[0, N)`` is an :class:`~graphadapt.contract.InputError`), and, as in
AdapterHub's ``forward(..., task_ids=["t1", "t0"])``, a list of task names is accepted for the ids.
Gradients reach each task's adapter only through its rows.
"""

from __future__ import annotations

import torch

from ..contract import InputError
from .route import TASK_INPUT, check_adapter_ids, coerce_adapter_ids


def coerce_task_ids(ids, names):
    """``task_ids`` as int64: a list of task names (AdapterHub's string form) becomes their positions in the
    MultiTask; integer lists / numpy arrays become a tensor; anything else is left for :func:`check_task_ids`."""
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, str) for t in ids):
        names = list(names)
        unknown = sorted({t for t in ids if t not in names})
        if unknown:
            raise InputError(f"task_ids names {unknown}, not tasks of the MultiTask {names}; pass one task name "
                             "(or its index) per batch row")
        return torch.tensor([names.index(t) for t in ids], dtype=torch.int64)
    return coerce_adapter_ids(ids)


def check_task_ids(ids, names, batch: int | None) -> None:
    """Eager check of a MultiTask call's ``task_ids``: given, 1-D integers, one per row, each in ``[0, N)``."""
    check_adapter_ids(ids, len(names), batch, names, input=TASK_INPUT, base=False)


__all__ = ["TASK_INPUT", "check_task_ids", "coerce_task_ids"]
