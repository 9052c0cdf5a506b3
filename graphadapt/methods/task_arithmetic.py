"""Task-vector arithmetic shared by the methods that implement ``add_weighted_adapter`` (no method of its own).

The combination rules are PEFT's (``peft/utils/merge_utils.py``, 0.22), re-derived so that the same inputs give the
same tensors: every rule stacks the task tensors ``T_i`` on a new first axis and weights them with ``w_i``:

* ``linear``: ``Σ w_i T_i``;
* ``magnitude_prune``: ``Σ w_i top_k(T_i)`` — each ``T_i`` keeps its ``int(density · numel)`` largest magnitudes;
* ``ties``: prune by magnitude, elect a sign per entry (``total``: sign of ``Σ T_i``; ``frequency``: sign of ``Σ
  sign(T_i)``; 0 counts as +), then the mean of the weighted entries that agree with it (``disjoint merge``);
* ``dare_linear`` / ``dare_ties``: as ``linear`` / ``ties`` but pruned at random — each entry kept with probability
  ``density`` (a Bernoulli draw per entry, from the given generator) and rescaled by ``1 / density``.

``density >= 1`` prunes nothing (and draws nothing), as PEFT. Random masks come from an explicit
:class:`torch.Generator`: one seeded with ``s`` draws what PEFT draws after ``torch.manual_seed(s)`` when the tensors
are visited in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SpecError

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Rules applied to each factor (or vector) of same-shaped task tensors."""
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""Rules applied to the full weight deltas, then factorised by SVD (``svd`` is ``linear`` on the deltas)."""
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")


def check_options(combination_type: str, allowed: tuple[str, ...], density, majority_sign_method: str) -> None:
    """Clear errors for a combination ``allowed`` does not hold, a missing/invalid ``density``, or a bad sign rule."""
    if combination_type not in allowed:
        raise SpecError(f"combination_type {combination_type!r} is not available here; choose one of "
                        f"{', '.join(allowed)}", field="combination_type")
    if combination_type in NEEDS_DENSITY:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or \
                not 0.0 <= float(density) <= 1.0:
            raise SpecError(f"combination_type {combination_type!r} needs density, the fraction of entries kept, "
                            f"a number in [0, 1]; got {density!r}", field="density")
    if majority_sign_method not in SIGN_METHODS:
        raise SpecError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}",
                        field="majority_sign_method")


def _weighted(stacked: Tensor, weights: Tensor) -> Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _prune_magnitude(t: Tensor, density: float) -> Tensor:
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return (t * mask) / density


def _prune(t: Tensor, density: float, how: str, generator: torch.Generator | None) -> Tensor:
    if density >= 1:
        return t
    return _prune_magnitude(t, density) if how == "magnitude" else _prune_random(t, density, generator)


def _sign_mask(stacked: Tensor, method: str) -> Tensor:
    sign = stacked.sign()
    total = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(total >= 0, 1, -1)


def combine(rule: str, tensors: list[Tensor], weights: Tensor, density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Combine same-shaped ``tensors`` by ``rule`` (one of :data:`COMBINATIONS`, or an ``*_svd`` rule's base: ``svd``
    means ``linear``) with ``weights`` (a 1-d tensor, one per tensor)."""
    base = rule[: -len("_svd")] if rule.endswith("_svd") else rule
    base = "linear" if base == "svd" else base
    if base in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude", generator) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random", generator) for t in tensors]
    elif base != "linear":
        raise SpecError(f"unknown combination rule {rule!r}", field="combination_type")
    stacked = torch.stack(tensors, dim=0)
    if base in ("ties", "dare_ties"):
        mask = _sign_mask(stacked, majority_sign_method)
        weighted = _weighted(stacked, weights)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return _weighted(stacked, weights).sum(dim=0)


def svd_factors(delta: Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation of ``delta [out, in]``
    (``B = U_r diag(S_r)``, ``A = V_rᵀ``, as PEFT); ``clamp`` (a quantile in [0, 1]) clips both factors to
    ``±q`` with ``q`` that quantile of their joint entries, as PEFT's ``svd_clamp``. Ranks above ``min(out, in)`` get zero rows and
    columns (the extra components of an exact factorisation are zero)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    b = u[:, :k] @ torch.diag(s[:k])
    a = vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b


def exact_targets(sites) -> tuple[str, ...]:
    """A ``targets`` value selecting exactly these linear sites (site names; a fused projection's slice by its own
    name): one full-match regex."""
    import re

    names = sorted(set(sites))
    return ("re:" + "|".join(f"(?:{re.escape(n)})" for n in names),)


__all__ = ["COMBINATIONS", "NEEDS_DENSITY", "SIGN_METHODS", "SVD_COMBINATIONS", "check_options", "combine",
           "exact_targets", "svd_factors"]
