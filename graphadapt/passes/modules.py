"""What the passes ask of the adapter modules they place: the module protocols.

A pass never probes a module by a method's attribute names (``lora_A``, ``use_dora``…); it asks these:

* every adapter module: ``active`` (bool; an inactive module passes its input through);
* a linear-site module (:class:`LinearSiteModule`), called ``(x, y, W, b) → y'`` after ``y = op(x, W, b)``:

  - ``mergeable`` (bool) and ``merge_refusal`` (str or None: why not, shown in merge reports);
  - ``fold(W, b[, base_weight=W0]) → (W', b')`` with ``op(x, W', b') == forward(x, op(x, W, b), W, b)`` in
    eval mode (new tensors, full fused shape and base layout; ``base_weight`` is the unmerged base when
    ``W`` already holds earlier folds);
  - ``reads_base_weight`` (a label or None): its forward reads ``W`` itself (DoRA's norm), so nothing else may
    be folded into ``W`` while it stays in the graph;
  - optionally ``low_rank_delta() → LowRankDelta | None``: when the module's whole effect is
    ``y' = y + s · x Aᵀ Bᵀ`` on the full ``[out, in]`` weight, the factors. The merge pass then folds with one
    fused ``addmm`` (``W + s·B@A``) instead of calling ``fold``. The same factors are what a per-row gathered
    evaluation (several adapters stacked, one selected per batch row) and an export taking adapter weights
    as graph inputs are built from (see docs/architecture.md, "Deployment extensions").

  - optionally ``routed_form(W, b) → RoutedForm | None``: the module's effect as terms that per-row routing
    (``Route``) stacks over adapters and gathers by row — live tensors (gradients flow), None when no such form
    is exact right now (a fused slice, a gate, dropout in training): routing then runs the module on every row
    and selects.
* optionally, any module: the *swap slot* protocol (:class:`SwappableModule`), used by swappable ONNX exports
  (``graphadapt.exporters.swappable``) and hot-swap (``graphadapt.hotswap``): ``swap_refusal`` (str or None),
  ``swap_rank()`` (the size zero-padded up to a slot's ``max_rank``: LoRA's rank, a bottleneck's width; None
  when there is none), ``swap_signature()`` (what must match between a slot and what goes into it),
  ``swap_tensors(rank)`` (the module's tensors in *slot form*: constants that differ between adapters, such as
  LoRA's ``alpha/r``, folded into them, rank-like dims zero-padded to ``rank``; keys are parameter names of the
  module once in slot form) and ``make_swap_slot_(rank)`` (turn the module into its slot form in place: same
  function, its parameters exactly ``swap_tensors(rank)``).

Residual-point modules follow :class:`graphadapt.composition.site.ResidualSiteModule` (``pre``/``core``/``post``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW = scale · B @ A`` on a linear site's full ``[out, in]`` base weight."""

    A: Tensor
    """``[r, in]`` (detached)."""
    B: Tensor
    """``[out, r]`` (detached)."""
    scale: float


@dataclass(frozen=True)
class RoutedForm:
    """A linear-site module's effect on the full ``[out, in]`` site, as terms stackable over adapters::

        y' = y + gain ⊙ (y − b) + shift + (x Aᵀ) (factor ⊙ scale · B)ᵀ + (x ⊙ in_gain) Wᵀ

    Every term is optional (None: absent). LoRA: ``A, B, scale``; DoRA: also ``factor = m/‖W + s·BA‖`` and
    ``gain = factor − 1``; IA3 on outputs: ``gain = l − 1, shift = (l − 1) ⊙ b``; IA3 on inputs: ``in_gain = l − 1``.
    """

    A: Tensor | None = None
    """``[r, in]``."""
    B: Tensor | None = None
    """``[out, r]``."""
    scale: float = 1.0
    factor: Tensor | None = None
    """``[out]``: multiplies the low-rank term per output channel."""
    gain: Tensor | None = None
    """``[out]``: times ``y − b``."""
    shift: Tensor | None = None
    """``[out]``: added."""
    in_gain: Tensor | None = None
    """``[in]``: ``(x ⊙ in_gain) Wᵀ`` added."""


@runtime_checkable
class RoutableModule(Protocol):
    """A linear-site module that offers a :class:`RoutedForm` (when it has one)."""

    def routed_form(self, weight: Tensor, bias: Tensor | None = None) -> RoutedForm | None: ...


def routed_form(mod, weight: Tensor, bias: Tensor | None = None) -> RoutedForm | None:
    """The module's :class:`RoutedForm`, or None when it has none (or does not offer one)."""
    return mod.routed_form(weight, bias) if isinstance(mod, RoutableModule) else None


@runtime_checkable
class LinearSiteModule(Protocol):
    """A module at a linear site (see the module docstring for the merge attributes)."""

    active: bool

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class FoldableModule(Protocol):
    """A linear-site module that can fold into the base weight."""

    mergeable: bool

    def fold(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...


@runtime_checkable
class LowRankModule(Protocol):
    """A linear-site module whose effect is a low-rank additive weight update (when it says so)."""

    def low_rank_delta(self) -> LowRankDelta | None: ...


def low_rank_delta(mod) -> LowRankDelta | None:
    """The module's :class:`LowRankDelta`, or None when it has none (or does not offer one)."""
    return mod.low_rank_delta() if isinstance(mod, LowRankModule) else None


@runtime_checkable
class SwappableModule(Protocol):
    """A module whose weights can be replaced by another adapter's without changing the graph (see above)."""

    swap_refusal: str | None

    def swap_rank(self) -> int | None: ...

    def swap_signature(self) -> tuple: ...

    def swap_tensors(self, rank: int | None = None) -> dict[str, Tensor]: ...

    def make_swap_slot_(self, rank: int | None = None) -> None: ...


def swap_refusal(mod) -> str | None:
    """Why ``mod`` has no swap slot form (None when it has one)."""
    if not isinstance(mod, SwappableModule):
        return f"{type(mod).__name__} does not offer the swap slot protocol (graphadapt.passes.modules.SwappableModule)"
    return mod.swap_refusal


__all__ = ["FoldableModule", "LinearSiteModule", "LowRankDelta", "LowRankModule", "RoutableModule", "RoutedForm",
           "SwappableModule", "low_rank_delta", "routed_form", "swap_refusal"]
