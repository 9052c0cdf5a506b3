"""AdaLoRA at one linear site (PEFT's ``SVDLinear``): ``y' = y + s/(r₀ + 1e-5) · B (A ⊙ E) dropout(x)``.

``svd_A`` [r, in] (right singular vectors), ``svd_E`` [r, 1] (singular values, zero at init: identity),
``svd_B`` [out, r] (left singular vectors) — PEFT's ``lora_A``, ``lora_E``, ``lora_B``; ``r₀`` (``ranknum``) is the initial rank, kept when a saved rank pattern
shrinks ``r`` (PEFT keeps it too, so the scaling does not change). Mergeable: ``W' = W + s/(r₀+1e-5)·B(A⊙E)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.methods.sliced import SlicedSiteModule
from graphadapt.passes.modules import LowRankDelta


class AdaLoRAModule(SlicedSiteModule):
    """``(x, y, W, b) → y'`` (see module docstring)."""

    mergeable = True
    merge_refusal = None

    def __init__(self, in_features: int, out_features: int, *, r: int, ranknum: float, scaling: float,
                 dropout: float = 0.0, fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None,
                 dtype=None, device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.r, self.ranknum, self.scaling = r, float(ranknum), float(scaling)
        factory = {"dtype": dtype, "device": device}
        self.svd_A = nn.Parameter(torch.zeros(r, in_features, **factory))
        self.svd_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.svd_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()

    @property
    def factor(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        if x.dtype != self.svd_A.dtype:
            x = x.to(self.svd_A.dtype)
        h = F.linear(F.linear(self.dropout(x), self.svd_A * self.svd_E), self.svd_B) * self.factor
        return self._replace_slice(y, self._own(y) + h.to(y.dtype))

    def delta_rows(self) -> Tensor:
        """``s/(r₀+1e-5) · B (A ⊙ E)`` as ``[out, in]`` (this module's rows)."""
        return self.svd_B @ (self.svd_A * self.svd_E) * self.factor

    def low_rank_delta(self) -> LowRankDelta | None:
        if self.out_slice is not None or self.out_rows is not None or self.fan_in_fan_out:
            return None
        return LowRankDelta((self.svd_A * self.svd_E).detach(), self.svd_B.detach(), self.factor)

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        new = weight.detach().clone()
        rows = self._rows(new)
        rows.add_(self.delta_rows().to(dtype=weight.dtype, device=weight.device))
        self._commit_rows(new, rows)
        return new, None if bias is None else bias.detach().clone()

    def orth_penalty(self) -> tuple[Tensor, Tensor]:
        """``‖AAᵀ − I‖_F`` and ``‖BᵀB − I‖_F`` (PEFT's orthogonality regulariser terms)."""
        a, b = self.svd_A @ self.svd_A.T, self.svd_B.T @ self.svd_B
        return (torch.norm(a - torch.eye(*a.shape, dtype=a.dtype, device=a.device), p="fro"),
                torch.norm(b - torch.eye(*b.shape, dtype=b.dtype, device=b.device), p="fro"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"ranknum={self.ranknum:g}, scaling={self.scaling:g}")


__all__ = ["AdaLoRAModule"]
