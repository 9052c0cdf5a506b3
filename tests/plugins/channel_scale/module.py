"""Toy module: ``(x, y, W, b) → (1 + s) ⊙ y``, foldable into ``W`` and ``b``."""

from __future__ import annotations

import torch
from torch import nn


class ChannelScaleModule(nn.Module):
    mergeable = True

    def __init__(self, out_features: int, fan_in_fan_out: bool, init: float, dtype=None, device=None):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.scale = nn.Parameter(torch.full((out_features,), float(init), dtype=dtype, device=device))
        self.active = True

    def forward(self, x, y, weight, bias):
        if not self.active:
            return y
        return y * (1 + self.scale)

    def fold(self, weight, bias):
        f = 1 + self.scale.detach()
        w = weight * f if self.fan_in_fan_out else weight * f[:, None]
        return w, None if bias is None else bias * f
