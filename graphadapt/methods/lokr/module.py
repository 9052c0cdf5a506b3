"""LoKr at one linear site: ``y' = y + x ΔWᵀ``, ``ΔW = (alpha/r) · W1 ⊗ W2`` (PEFT's ``lokr.Linear``).

``out = a·b`` and ``in = c·d`` are factorised as PEFT does (:func:`factorization`); ``W1`` is ``[a, c]``, ``W2`` is
``[b, d]``. Each is a full matrix (``lokr_w1``/``lokr_w2``) or a rank-``r`` product (``lokr_w1_a @ lokr_w1_b``,
``lokr_w2_a @ lokr_w2_b``): ``W1`` is decomposed only with ``decompose_both`` and ``r < max(a, c)/2``, ``W2`` when
``r < max(b, d)/2``. Parameter names and shapes are PEFT's, so checkpoints copy 1:1; absent factors are None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.methods.delta import DeltaSiteModule


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension = m·n`` with ``m <= n``: ``m = factor`` when it divides, else the pair nearest the square root
    whose smaller side does not exceed ``factor`` (PEFT's / LyCORIS's rule, reproduced for identical shapes)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrModule(DeltaSiteModule):
    def __init__(self, site, *, r: int, alpha: float, decompose_both: bool = False, decompose_factor: int = -1,
                 rank_dropout: float = 0.0, rank_dropout_scale: bool = False, module_dropout: float = 0.0,
                 dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.rank_dropout, self.rank_dropout_scale = float(rank_dropout), bool(rank_dropout_scale)
        self.module_dropout = float(module_dropout)
        out_l, out_k = factorization(self.out_features, decompose_factor)
        in_m, in_n = factorization(self.in_features, decompose_factor)
        f = {"dtype": dtype, "device": device}
        full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = not (r < max(out_k, in_n) / 2)
        param = lambda *shape: nn.Parameter(torch.zeros(*shape, **f))  # noqa: E731
        for name, full, (a, b) in (("lokr_w1", full_w1, (out_l, in_m)), ("lokr_w2", full_w2, (out_k, in_n))):
            self.register_parameter(name, param(a, b) if full else None)
            self.register_parameter(f"{name}_a", None if full else param(a, r))
            self.register_parameter(f"{name}_b", None if full else param(r, b))

    def factors(self) -> tuple[Tensor, Tensor]:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2.contiguous()) * self.scaling

    def delta_output(self, x: Tensor) -> Tensor:
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            drop = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                drop = drop / drop.mean()
            delta = delta * drop.unsqueeze(1)
        out = F.linear(x, delta)
        if self.training and self.module_dropout:
            out = out * (torch.rand(1, device=out.device) > self.module_dropout).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        w1, w2 = (tuple(t.shape) for t in self.factors())
        return ", ".join(self._site_repr() + [f"r={self.r}", f"alpha={self.alpha:g}", f"w1={w1}", f"w2={w2}"])


__all__ = ["LoKrModule", "factorization"]
