"""RandLoRA at one linear site (PEFT's ``randlora.Linear``), ``k = min(in, out)``, ``n = ceil(k / r)`` bases::

    Â = (λ[:, :, None] · A[:, :n, :k] · γ[None]).flatten(0, 1)   [r·n, k]        B̂ = B[:max, :n, :].flatten(1)   [max, n·r]
    in <= out:  y' = y + s · (x Âᵀ) B̂ᵀ            else:  y' = y + s · (x B̂) Â          ΔW = s · (second @ first)

(the two flattenings pair their indices in different orders; this is PEFT's map, reproduced as is). ``A``
[r, 1, k_max] and ``B`` [max_max, n_max, r] are frozen, shared by the adapter's sites (:class:`RandLoRABases` at
``adapters.<name>.randlora_bases``; PEFT's ``base_model.randlora_A``/``randlora_B``). ``randlora_lambda`` [r, n]
and ``randlora_gamma`` [n, k] have PEFT's names and shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.methods.delta import DeltaSiteModule, SharedRef


def num_bases(in_features: int, out_features: int, r: int) -> int:
    return math.ceil(min(in_features, out_features) / r)


class RandLoRABases(nn.Module):
    """The frozen random bases shared by one RandLoRA adapter's sites."""

    def __init__(self, r: int, max_in: int, max_out: int, dtype=None, device=None):
        super().__init__()
        f = {"dtype": dtype, "device": device}
        lo, hi = min(max_in, max_out), max(max_in, max_out)
        self.randlora_A = nn.Parameter(torch.zeros(r, 1, lo, **f), requires_grad=False)
        self.randlora_B = nn.Parameter(torch.zeros(hi, num_bases(lo, lo, r), r, **f), requires_grad=False)


class RandLoRAModule(DeltaSiteModule):
    def __init__(self, site, bases: RandLoRABases, *, r: int, alpha: float, dropout: float = 0.0, dtype=None,
                 device=None):
        super().__init__()
        self._init_delta(site, dropout)
        self.r, self.scaling = r, float(alpha) / r
        self._shared = SharedRef(bases)
        self.num_bases = num_bases(self.in_features, self.out_features, r)
        f = {"dtype": dtype, "device": device}
        self.randlora_lambda = nn.Parameter(torch.zeros(r, self.num_bases, **f))
        self.randlora_gamma = nn.Parameter(torch.zeros(self.num_bases, min(self.in_features, self.out_features), **f))

    def _pair(self) -> tuple[Tensor, Tensor]:
        """``(first [k', in], second [out, k'])``: ``y' = y + s · linear(linear(x, first), second)``."""
        lo, hi = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        b = self._shared.module
        a = b.randlora_A[:, : self.num_bases, :lo]
        update_b = b.randlora_B[:hi, : self.num_bases, :].flatten(start_dim=1)
        update_a = (self.randlora_lambda[:, :, None] * a * self.randlora_gamma[None]).flatten(end_dim=1)
        if lo == self.in_features:
            return update_a, update_b
        return update_b.T, update_a.T

    def delta_weight(self) -> Tensor:
        first, second = self._pair()
        return (second @ first) * self.scaling

    def delta_output(self, x: Tensor) -> Tensor:
        first, second = self._pair()
        return F.linear(F.linear(x, first), second) * self.scaling

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}", f"bases={self.num_bases}", f"scaling={self.scaling:g}"])


__all__ = ["RandLoRABases", "RandLoRAModule", "num_bases"]
