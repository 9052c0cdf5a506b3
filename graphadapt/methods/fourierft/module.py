"""FourierFT at one linear site (PEFT's ``FourierFTLinear``)::

    ΔW = scaling · Re(ifft2(S)),  S[r_t, c_t] = s_t (t < n_frequency), 0 elsewhere;   y' = y + x ΔWᵀ

The locations ``(r_t, c_t)`` are PEFT's: the first ``n_frequency`` entries of ``randperm(out·in)`` from
``Generator().manual_seed(random_loc_seed)``, as ``(idx // in, idx % in)``. With a real, sparse ``S`` the inverse DFT
is a sum of cosines, ``ΔW[a, b] = scaling/(out·in) · Σ_t s_t cos(2π(r_t a/out + c_t b/in))``, computed here as
``(C_r diag(s) C_c − S_r diag(s) S_c)·scaling/(out·in)`` with integer-reduced phases: real arithmetic only (no
complex tensors, so it exports to ONNX) and a rank-2·n_frequency product. ``fourierft_spectrum`` [n_frequency] has
PEFT's name and shape; the locations are a non-persistent buffer (derived from the spec).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule


def frequency_locations(out_features: int, in_features: int, n: int, seed: int) -> Tensor:
    """PEFT's ``[2, n]`` (row, column) locations."""
    idx = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([idx // in_features, idx % in_features], dim=0)


class FourierFTModule(DeltaSiteModule):
    def __init__(self, site, *, n_frequency: int, scaling: float, random_loc_seed: int, dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        if n_frequency > self.in_features * self.out_features:
            raise SpecError(f"n_frequency={n_frequency} exceeds in·out = {self.in_features * self.out_features} at "
                            f"{site.name}; lower it", field="n_frequency")
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, float(scaling), random_loc_seed
        self.register_buffer("fourierft_locations", frequency_locations(self.out_features, self.in_features, n_frequency,
                                                              random_loc_seed).to(device), persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n_frequency, dtype=dtype, device=device))

    def delta_weight(self) -> Tensor:
        m, n = self.out_features, self.in_features
        s = self.fourierft_spectrum
        rows, cols = self.fourierft_locations[0], self.fourierft_locations[1]
        a = torch.arange(m, device=s.device)
        b = torch.arange(n, device=s.device)
        # phases reduced mod the period in integers before the float conversion: exact angles in [0, 2π)
        pr = torch.remainder(a.unsqueeze(1) * rows.unsqueeze(0), m).to(s.dtype) * (2 * math.pi / m)   # [m, F]
        pc = torch.remainder(cols.unsqueeze(1) * b.unsqueeze(0), n).to(s.dtype) * (2 * math.pi / n)   # [F, n]
        delta = (torch.cos(pr) * s) @ torch.cos(pc) - (torch.sin(pr) * s) @ torch.sin(pc)
        return delta * (self.scaling / (m * n))

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"n_frequency={self.n_frequency}", f"scaling={self.scaling:g}"])


__all__ = ["FourierFTModule", "frequency_locations"]
