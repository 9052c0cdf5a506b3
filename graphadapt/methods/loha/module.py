"""LoHa at one linear site: ``y' = y + x ΔWᵀ``, ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)`` (PEFT's ``loha.Linear``).

Parameters have PEFT's names and shapes (``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in], ``hada_w2_a``,
``hada_w2_b``), so ``<path>.hada_w1_a`` copies 1:1. Training-time ``rank_dropout`` (rows of ΔW dropped, kept rows
rescaled by 1/mean) and ``module_dropout`` (the whole update skipped, as a 0/1 factor) follow PEFT; eval is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.methods.delta import DeltaSiteModule


def row_dropout(delta: Tensor, p: float) -> Tensor:
    """PEFT's rank dropout of a delta weight: rows kept with probability ``1 - p``, rescaled by 1/mean (global RNG,
    like dropout)."""
    drop = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    return delta * (drop / drop.mean()).unsqueeze(1)


class LoHaModule(DeltaSiteModule):
    def __init__(self, site, *, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        f = {"dtype": dtype, "device": device}
        out, inp = self.out_features, self.in_features
        self.hada_w1_a = nn.Parameter(torch.zeros(out, r, **f))
        self.hada_w1_b = nn.Parameter(torch.zeros(r, inp, **f))
        self.hada_w2_a = nn.Parameter(torch.zeros(out, r, **f))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, inp, **f))

    def delta_weight(self) -> Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def delta_output(self, x: Tensor) -> Tensor:
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            delta = row_dropout(delta, self.rank_dropout)
        out = torch.nn.functional.linear(x, delta)
        if self.training and self.module_dropout:
            out = out * (torch.rand(1, device=out.device) > self.module_dropout).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}", f"alpha={self.alpha:g}"])


__all__ = ["LoHaModule"]
