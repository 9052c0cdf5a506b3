"""NICE coupling block at the embedding output: ``(h, attention_mask) → h'`` (site kind ``hidden``, point
``embedding_output``).

before:  ``h`` [B, T, H]
after:   ``h' = [y1; y2]``, ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with ``x1 = h[..., :H//2]``, ``x2 = h[..., H//2:]``;
         :meth:`NiceCoupling.inverse` undoes it exactly (``x2 = y2 − G(y1)``, ``x1 = y1 − F(x2)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.methods.activations import get_activation


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _subnet(d_in: int, d_out: int, reduction_factor: float, act: str, generator, dtype, device) -> nn.Sequential:
    mid = int(d_in // reduction_factor)
    net = nn.Sequential(nn.Linear(d_in, mid, dtype=dtype, device=device), _Act(act),
                        nn.Linear(mid, d_out, dtype=dtype, device=device))
    with torch.no_grad():  # AdapterHub's init_bert_weights: N(0, 0.02) weights, zero biases
        for lin in (net[0], net[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 0.02)
            lin.bias.zero_()
    return net


class NiceCoupling(nn.Module):
    mergeable = False
    merge_refusal = "an invertible adapter transforms the embedding output non-linearly (no weight to fold into)"

    def __init__(self, hidden: int, reduction_factor: float, non_linearity: str, generator: torch.Generator,
                 dtype=None, device=None):
        super().__init__()
        self.split1 = hidden // 2
        split2 = hidden - self.split1
        self.F = _subnet(split2, self.split1, reduction_factor, non_linearity, generator, dtype, device)
        self.G = _subnet(self.split1, split2, reduction_factor, non_linearity, generator, dtype, device)
        self.active = True

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if not self.active:
            return h
        x1, x2 = h[..., :self.split1], h[..., self.split1:]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat((y1, y2), -1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[..., :self.split1], y[..., self.split1:]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat((x1, x2), -1)


__all__ = ["NiceCoupling"]
