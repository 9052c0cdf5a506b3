"""HRA as one module that a graph pass calls at a linear site (PEFT 0.22 ``HRALinear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = HRAModule(x, y, W, b) = y + (x Hᵀ - x) W_rowsᵀ        (= linear(x Hᵀ, W, b) alone)

``H = H_1 ⋯ H_r`` with ``H_i = I - 2 v_i v_iᵀ`` (``v_i`` the unit columns of ``hra_u`` [in, r]); PEFT forms the
same product in compact WY form (``I - V T Vᵀ``, a triangular solve); here ``x Hᵀ = x H_r ⋯ H_1`` is applied one
reflection at a time (plain tensor ops, exportable). With ``apply_GS``: ``H = I - 2 Q Qᵀ``, ``Q`` from modified
Gram–Schmidt of the columns (PEFT: QR; ``Q Qᵀ`` does not depend on the columns' signs). ``fold``:
``W' = W + W0 (H - I)`` on the owned rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..transforms import InputTransformModule

__all__ = ["HRAModule"]


class HRAModule(InputTransformModule):
    reads_base_weight = "HRA"

    def __init__(self, in_features: int, out_features: int, *, r: int, apply_GS: bool = False,
                 fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None, dtype=None,
                 device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.r, self.apply_GS = int(r), bool(apply_GS)
        self.hra_u = nn.Parameter(torch.zeros(in_features, r, dtype=dtype, device=device))

    def _orthonormal(self, u: Tensor) -> Tensor:
        cols = []
        for i in range(u.shape[1]):
            c = u[:, i]
            for q in cols:
                c = c - (q @ c) * q
            cols.append(c / c.norm())
        return torch.stack(cols, dim=1)

    def transform_input(self, x: Tensor) -> Tensor:
        u = self.hra_u
        if self.apply_GS:
            q = self._orthonormal(u)
            return x - 2.0 * (x @ q) @ q.t()
        v = u / u.norm(dim=0)
        for i in reversed(range(self.r)):
            vi = v[:, i]
            x = x - 2.0 * (x @ vi).unsqueeze(-1) * vi
        return x

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
                + (", apply_GS=True" if self.apply_GS else ""))
