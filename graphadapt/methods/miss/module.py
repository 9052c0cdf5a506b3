"""MiSS as one module that a graph pass calls at a linear site (PEFT 0.22 ``MissLinear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = MiSSModule(x, y, W, b) = y + x ΔWᵀ

* standard / mini: ``x ΔWᵀ = (Σ_blocks pad(x)[…, k·r:(k+1)·r]) @ D`` — the input cut into r-wide blocks (zero
  padded to a multiple of r), summed, times the shard ``D = miss_block`` [r, out] (mini: [r, mini_r] repeated
  along the outputs). ``ΔW[o, j] = D[j mod r, o]``.
* bat: ``ΔW`` = blocks of ``W0`` [out/r, r, in/r, r] as ``W_blk D + D`` (``D`` [out/r, r, r]), so the forward reads
  ``W`` (``reads_base_weight``).

``fold``: ``W' = W + ΔW`` on the owned rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import WeightUpdateModule

__all__ = ["MiSSModule"]


class MiSSModule(WeightUpdateModule):
    def __init__(self, in_features: int, out_features: int, *, r: int, mode: str = "standard", mini_r: int = 1,
                 dropout: float = 0.0, fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None,
                 dtype=None, device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.r, self.mode, self.mini_r = int(r), mode, int(mini_r)
        shape = {"standard": (r, out_features), "mini": (r, mini_r), "bat": (out_features // r, r, r)}[mode]
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reads_base_weight = "MiSS (bat)" if mode == "bat" else None

    def _shard(self) -> Tensor:
        d = self.miss_block
        return d.repeat(1, self.out_features // self.mini_r) if self.mode == "mini" else d

    def delta_weight(self, rows: Tensor) -> Tensor:
        d = self.miss_block
        if self.mode == "bat":
            r = self.r
            out, n_in = rows.shape
            w = rows.reshape(out // r, r, n_in // r, r).permute(2, 0, 1, 3)
            return (w @ d + d).permute(1, 2, 0, 3).reshape(out, n_in)
        shard = self._shard()
        reps = -(-self.in_features // self.r)
        return shard.t().repeat(1, reps)[:, : self.in_features]

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        if self.mode == "bat":
            return super().forward(x, y, weight, bias)
        shard = self._shard()
        x = x.to(shard.dtype)
        pad = (-x.shape[-1]) % self.r
        if pad:
            x = F.pad(x, (0, pad))
        x = self.dropout(x)
        summed = x.reshape(*x.shape[:-1], x.shape[-1] // self.r, self.r).sum(dim=-2)
        return self._replace_slice(y, self._own(y) + summed @ shard)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, mode={self.mode}"
                + (f", mini_r={self.mini_r}" if self.mode == "mini" else ""))
