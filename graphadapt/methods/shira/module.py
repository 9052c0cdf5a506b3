"""SHiRA at one linear site (PEFT's ``shira.Linear``)::

    ΔW[r_k, c_k] = shira_weight[k] (k < r·(in + out)), 0 elsewhere;    y' = y + x ΔWᵀ

PEFT's forward is ``linear(x, W + ΔW, b)``, the same map. ``shira_weight`` [K] and ``shira_indices`` [2, K] (int32,
row-major sorted positions; a persistent buffer, saved with the adapter) have PEFT's names and shapes. ``ΔW`` is
formed by a scatter into ``out·in`` zeros (ONNX ``ScatterElements``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule


def random_positions(out_features: int, in_features: int, count: int, generator: torch.Generator) -> Tensor:
    """PEFT's ``random_mask`` as ``[2, count]`` int32 (row, column) positions in row-major order."""
    idx = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([idx // in_features, idx % in_features]).to(torch.int32)


class SHiRAModule(DeltaSiteModule):
    def __init__(self, site, *, r: int, dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        count = r * (self.in_features + self.out_features)
        if count > self.in_features * self.out_features:
            raise SpecError(f"SHiRA r={r} asks for {count} entries at {site.name}, more than its in·out = "
                            f"{self.in_features * self.out_features}; lower r", field="r")
        self.r, self.scaling = r, 1.0
        self.shira_weight = nn.Parameter(torch.zeros(count, dtype=dtype, device=device))
        self.register_buffer("shira_indices", torch.zeros(2, count, dtype=torch.int32, device=device))

    def delta_weight(self) -> Tensor:
        flat = self.shira_indices[0].long() * self.in_features + self.shira_indices[1].long()
        w = self.shira_weight * self.scaling
        return w.new_zeros(self.out_features * self.in_features).scatter(0, flat, w).view(
            self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}", f"entries={self.shira_weight.numel()}"])


__all__ = ["SHiRAModule", "random_positions"]
