"""VeRA at one linear site (PEFT's ``vera.Linear``)::

    y' = y + λ_b ⊙ ((λ_d ⊙ (dropout(x) A[:, :in]ᵀ)) B[:out]ᵀ)        ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in]

``A`` [r, max_in] and ``B`` [max_out, r] are frozen and shared by every site of the adapter: they live once in
:class:`VeRAProjections` at ``adapters.<name>.vera_projections`` (PEFT's ``base_model.vera_A``/``vera_B``); each
site slices its own ``in``/``out``. ``vera_lambda_b`` [out] and ``vera_lambda_d`` [r] have PEFT's names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.methods.delta import DeltaSiteModule, SharedRef


class VeRAProjections(nn.Module):
    """The frozen random projections shared by one VeRA adapter's sites."""

    def __init__(self, r: int, max_in: int, max_out: int, dtype=None, device=None):
        super().__init__()
        f = {"dtype": dtype, "device": device}
        self.vera_A = nn.Parameter(torch.zeros(r, max_in, **f), requires_grad=False)
        self.vera_B = nn.Parameter(torch.zeros(max_out, r, **f), requires_grad=False)


class VeRAModule(DeltaSiteModule):
    def __init__(self, site, projections: VeRAProjections, *, r: int, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        self._init_delta(site, dropout)
        self.r = r
        self._shared = SharedRef(projections)
        f = {"dtype": dtype, "device": device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **f))
        self.vera_lambda_d = nn.Parameter(torch.zeros(r, **f))

    def _factors(self) -> tuple[Tensor, Tensor]:
        p = self._shared.module
        return p.vera_A[: self.r, : self.in_features], p.vera_B[: self.out_features, : self.r]

    def delta_weight(self) -> Tensor:
        a, b = self._factors()
        return (self.vera_lambda_b.unsqueeze(-1) * b) @ (self.vera_lambda_d.unsqueeze(-1) * a)

    def delta_output(self, x: Tensor) -> Tensor:
        a, b = self._factors()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}"])


__all__ = ["VeRAModule", "VeRAProjections"]
