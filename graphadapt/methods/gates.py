"""AdapterHub's per-example input gate, shared by the modules that offer ``use_gating`` at linear sites (LoRA and
IA3 plugins). Not a method: a building block, as :mod:`.sliced` is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InputGate(nn.Module):
    """Per-example gate ``x [..., in] → sigmoid(x G^T + g_b)`` averaged over the sequence.

    Holds ``weight`` [1, in] and ``bias`` [1] (AdapterHub's ``gate`` Linear with
    ``gating_heads=1``). Parameters start at zero; :func:`graphadapt.init.init_lora_`
    gives them AdapterHub's init (weight N(0, 0.02), bias nn.Linear's default).
    """

    def __init__(self, in_features: int, *, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        # torch.zeros instead of nn.Linear: nn.Linear.reset_parameters draws from the global RNG.
        self.weight = nn.Parameter(torch.zeros(1, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, S, in] → [B, 1, 1]`` (mean over S); ``[N, in] → [N, 1]`` (no sequence dim).

        AdapterHub takes ``mean(dim=1)`` of ``[B, S, 1]``. For inputs with more than one
        middle dim (``[B, S1, S2, in]``) all of them are averaged, so the gate stays one
        scalar per example.
        """
        g = torch.sigmoid(F.linear(x, self.weight, self.bias))
        if x.dim() >= 3:
            g = g.mean(dim=tuple(range(1, x.dim() - 1)), keepdim=True)
        return g

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, gating_heads=1"


__all__ = ["InputGate"]
