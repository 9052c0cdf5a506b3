"""DeLoRA as one module that a graph pass calls at a linear site (PEFT 0.22 ``DeloraLinear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = DeLoRAModule(x, y, W, b) = y + ((dropout(x) ⊙ w) Aᵀ ⊙ c) Bᵀ,   c_i = (λ / r) / (‖a_i‖ ‖b_i‖)

``A = delora_A`` [r, in], ``B = delora_B`` [out, r], ``λ = delora_lambda`` [1], norms clamped at 1e-4 as PEFT;
``w = delora_w_norm`` [in]: the column norms of the base weight's owned rows when the adapter was built (a
frozen parameter, saved and imported with the adapter, as PEFT's persistent buffer). ``fold``:
``W' = W + (B diag(c) A) ⊙ w``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import WeightUpdateModule

__all__ = ["DeLoRAModule"]


class DeLoRAModule(WeightUpdateModule):
    def __init__(self, in_features: int, out_features: int, *, r: int, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None, dtype=None,
                 device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.r = int(r)
        self.delora_A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.delora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.delora_lambda = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.delora_w_norm = nn.Parameter(torch.ones(in_features, dtype=dtype, device=device), requires_grad=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _coefficients(self) -> Tensor:
        an = torch.clamp(self.delora_A.norm(dim=1), min=1e-4)
        bn = torch.clamp(self.delora_B.norm(dim=0), min=1e-4)
        return (self.delora_lambda / self.r) / (an * bn)

    def delta_weight(self, rows: Tensor) -> Tensor:
        return (self.delora_B * self._coefficients()) @ self.delora_A * self.delora_w_norm.unsqueeze(0)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        x = x.to(self.delora_A.dtype)
        h = F.linear(self.dropout(x) * self.delora_w_norm, self.delora_A) * self._coefficients()
        return self._replace_slice(y, self._own(y) + F.linear(h, self.delora_B))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
