"""RoAd as one module that a graph pass calls at a linear site (PEFT 0.22 ``road.Linear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = RoAdModule(x, y, W, b) = y ⊙ c + rot(y) ⊙ s         (on the owned channels)

Within each group of ``g`` outputs (halves ``y₁ = y[:g/2]``, ``y₂ = y[g/2:]``), ``rot(y) = [-y₂, y₁]``;
``c = α cos θ``, ``s = α sin θ`` from ``road_theta``/``road_alpha`` (road_1: one (θ, α) per pair, repeated for
both halves; road_2: one per output; road_4: separate cos/sin angles and scales). It acts on everything in ``y``
(bias and earlier adapters included), so ``fold`` rotates the owned rows of ``W`` and entries of ``b``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..sliced import SlicedSiteModule

__all__ = ["RoAdModule"]


class RoAdModule(SlicedSiteModule):
    mergeable = True
    merge_refusal = None
    reads_base_weight = None

    def __init__(self, in_features: int, out_features: int, *, variant: str, group_size: int,
                 fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None, dtype=None,
                 device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.variant, self.group_size = variant, int(group_size)
        size = {"road_1": out_features // 2, "road_2": out_features, "road_4": out_features * 2}[variant]
        self.road_theta = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        self.road_alpha = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def _cols(self) -> tuple[Tensor, Tensor]:
        theta, alpha, g = self.road_theta, self.road_alpha, self.group_size
        if self.variant == "road_1":
            theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
            alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
            return alpha * theta.cos(), alpha * theta.sin()
        if self.variant == "road_2":
            return alpha * theta.cos(), alpha * theta.sin()
        theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
        return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), \
            alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()

    def rotate(self, t: Tensor) -> Tensor:
        """``t [..., out] ↦ t ⊙ c + rot(t) ⊙ s``."""
        c, s = self._cols()
        g = t.reshape(*t.shape[:-1], -1, 2, self.group_size // 2)
        half = torch.stack((-g[..., 1, :], g[..., 0, :]), dim=-2).reshape(t.shape)
        return t * c + half * s

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        return self._replace_slice(y, self.rotate(self._own(y).to(self.road_theta.dtype)))

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        new = weight.detach().clone()
        rows = self._rows(new)
        dt = self.road_theta.dtype
        rows.copy_(self.rotate(rows.t().to(dt)).t().to(rows.dtype))
        self._commit_rows(new, rows)
        if bias is None:
            return new, None
        b = bias.detach().clone()
        part = self._bias_slice(b)
        part.copy_(self.rotate(part.to(dt)).to(part.dtype))
        self._commit_bias(b, part)
        return new, b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, variant={self.variant}, "
                f"group_size={self.group_size}")
