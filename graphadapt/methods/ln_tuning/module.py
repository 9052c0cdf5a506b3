"""LN tuning as one module per norm, standing in for the norm's weight (and bias) where the graph reads them.

    before:  layer_norm(x, shape, γ, β, eps)          (or the RMSNorm pattern's mul(γ, ·))
    after:   layer_norm(x, shape, M(γ, "weight"), M(β, "bias"), eps),   M(p, name) = copy[name] if active else p

The copies start equal to the base weights (so the model is unchanged at init), train, and are what PEFT's
``ln_tuning_layers`` hold. ``fold_parameter`` (merge): the copy becomes the norm's weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LNTuningModule"]


class LNTuningModule(nn.Module):
    mergeable = True
    merge_refusal = None

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.active = True
        for local, value in params.items():
            self.register_parameter(local, nn.Parameter(value.detach().clone(), requires_grad=True))

    def forward(self, p: Tensor, name: str) -> Tensor:
        if not self.active:
            return p
        return getattr(self, name)

    @torch.no_grad()
    def fold_parameter(self, p: Tensor, name: str) -> Tensor:
        """The norm parameter's merged value: the trained copy (PEFT's merge swaps the copy in)."""
        return getattr(self, name).detach().to(dtype=p.dtype, device=p.device).clone()

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))


