"""LN tuning as one module per norm, standing in for the norm's weight (and bias) where the graph reads them.

    before:  layer_norm(x, shape, γ, β, eps)          (or the RMSNorm pattern's mul(γ, ·))
    after:   layer_norm(x, shape, M(γ, "weight"), M(β, "bias"), eps),   M(p, name) = copy[name] if active else p

The copies start equal to the base weights (so the model is unchanged at init), train, and are what PEFT's
``ln_tuning_layers`` hold.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LNTuningModule"]


class LNTuningModule(nn.Module):
    mergeable = False
    merge_refusal = "LN tuning replaces the norm's weights where the graph reads them; nothing to fold"

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.active = True
        for local, value in params.items():
            self.register_parameter(local, nn.Parameter(value.detach().clone(), requires_grad=True))

    def forward(self, p: Tensor, name: str) -> Tensor:
        if not self.active:
            return p
        return getattr(self, name)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))


