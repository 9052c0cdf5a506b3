"""MTL-LoRA module at a whole linear site: ``(x, y, W, b) → y'``.

before: ``y = x Wᵀ + b``
after:  ``y' = y + s · Σ_k ŵ_k · (dropout(x) Aᵀ Λ) B_kᵀ`` (``s = alpha / r``, or AdapterHub's gate), with
        ``ŵ_k = exp(w_k / τ) / Σ_j exp(w_j / τ)``, ``Λ = diag(λ)``. Mergeable unless gated:
        ``W' = W + s · Σ_k ŵ_k B_k Λ A``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.passes.modules import RoutedForm


class MTLLoRAModule(nn.Module):
    out_slice = None      # whole sites only; read by the AdapterHub LoRA-format loader
    out_rows = None

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float, dropout: float, n_up: int,
                 sharpness: float, init: str, use_gating: bool, generator: torch.Generator, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.total_out = in_features, out_features, out_features
        self.scaling = alpha / r
        self.sharpness = sharpness
        f = dict(dtype=dtype, device=device)
        down = torch.zeros(r, in_features)
        up = torch.zeros(n_up, out_features, r)
        if init == "lora":
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(down, std=0.02, generator=generator)
            nn.init.normal_(up, std=0.02, generator=generator)
        self.proj_down = nn.Parameter(down.to(**f))
        self.proj_up = nn.Parameter(up.to(**f))
        self.task_values = nn.Parameter(torch.ones(r, **f))
        self.up_weights = nn.Parameter(torch.ones(n_up, **f))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if use_gating:
            self.gate = nn.Linear(in_features, 1, **f)
            with torch.no_grad():
                self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=generator) * 0.02)
                self.gate.bias.zero_()
        else:
            self.gate = None
        self.active = True

    @property
    def mergeable(self) -> bool:
        return self.gate is None

    @property
    def merge_refusal(self) -> str | None:
        return "gated MTL-LoRA depends on the input (its gate)" if self.gate is not None else None

    def _mix(self) -> Tensor:
        w = (self.up_weights / self.sharpness).exp()
        return w / w.sum()

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        low = F.linear(self.dropout(x), self.proj_down) * self.task_values          # [..., r]
        up = torch.einsum("k,kor->or", self._mix(), self.proj_up)                  # Σ_k ŵ_k B_k
        h = F.linear(low, up)
        if self.gate is not None:
            h = h * torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)
        else:
            h = h * self.scaling
        return y + h

    def routed_form(self, weight: Tensor, bias: Tensor | None = None) -> RoutedForm | None:
        """Stackable terms for per-row routing (Route / MultiTask; live tensors): ``A = Λ A``, ``B = Σ_k ŵ_k B_k``,
        ``s = alpha / r``. None where that is not the forward exactly: gated, or dropout while training."""
        if self.gate is not None or (self.training and not isinstance(self.dropout, nn.Identity)):
            return None
        up = torch.einsum("k,kor->or", self._mix(), self.proj_up)
        return RoutedForm(A=self.task_values[:, None] * self.proj_down, B=up, scale=self.scaling)

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None):
        up = torch.einsum("k,kor->or", self._mix(), self.proj_up)
        delta = self.scaling * (up * self.task_values) @ self.proj_down
        return weight + delta.to(weight.dtype), None if bias is None else bias.clone()

    def adapterhub_tensors(self) -> dict[str, nn.Parameter]:
        """AdapterHub tensor names (``loras.<name>.<key>``) → ours."""
        out = {"lora_A": self.proj_down, "lora_B": self.proj_up, "task_specific.values": self.task_values,
               "weights": self.up_weights}
        if self.gate is not None:
            out.update({"gate.weight": self.gate.weight, "gate.bias": self.gate.bias})
        return out


__all__ = ["MTLLoRAModule"]
