"""WaveFT at one linear site (PEFT's ``WaveFTLinear``, Haar wavelet)::

    S [H, W] = 0 except S[r_t, c_t] = s_t      (H, W: out, in rounded up to even; locations as FourierFT's)
    bands  cA = S[:H/2, :W/2]   cH = S[:H/2, W/2:]   cV = S[H/2:, :W/2]   cD = S[H/2:, W/2:]
    ΔW = scaling · (U_lo cA V_loᵀ + U_hi cH V_loᵀ + U_lo cV V_hiᵀ + U_hi cD V_hiᵀ)[:out, :in]

with the Haar synthesis matrices ``U_lo[2k, k] = U_lo[2k+1, k] = 1/√2``, ``U_hi[2k, k] = −U_hi[2k+1, k] = 1/√2``
(``V`` likewise over columns) — the map PEFT's ``waverec2d(…, "db1")`` computes, as matrix products (exportable).
``use_idwt=False``: ``ΔW = scaling · S``. ``waveft_spectrum`` [n_frequency] has PEFT's name and shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule


def haar_synthesis(n: int) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` [n, n/2] one-level Haar synthesis matrices (n even)."""
    lo, hi = torch.zeros(n, n // 2), torch.zeros(n, n // 2)
    k = torch.arange(n // 2)
    c = 1.0 / math.sqrt(2.0)
    lo[2 * k, k] = c
    lo[2 * k + 1, k] = c
    hi[2 * k, k] = c
    hi[2 * k + 1, k] = -c
    return lo, hi


class WaveFTModule(DeltaSiteModule):
    def __init__(self, site, *, n_frequency: int, scaling: float, random_loc_seed: int, use_idwt: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        m, n = self.out_features, self.in_features
        if n_frequency > m * n:
            raise SpecError(f"n_frequency={n_frequency} exceeds in·out = {m * n} at {site.name}; lower it",
                            field="n_frequency")
        self.n_frequency, self.scaling, self.use_idwt = n_frequency, float(scaling), bool(use_idwt)
        idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(random_loc_seed))[:n_frequency]
        rows, cols = idx // n, idx % n
        # the padded, even-sized coefficient grid (db1 adds no boundary rows; odd sizes gain one, cropped after)
        self.grid = (m + m % 2, n + n % 2) if use_idwt else (m, n)
        self.register_buffer("waveft_locations", (rows * self.grid[1] + cols).to(device), persistent=False)
        if use_idwt:
            for axis, size in (("u", self.grid[0]), ("v", self.grid[1])):
                lo, hi = haar_synthesis(size)
                self.register_buffer(f"_{axis}_lo", lo.to(dtype=dtype, device=device), persistent=False)
                self.register_buffer(f"_{axis}_hi", hi.to(dtype=dtype, device=device), persistent=False)
        self.waveft_spectrum = nn.Parameter(torch.zeros(n_frequency, dtype=dtype, device=device))

    def delta_weight(self) -> Tensor:
        (h, w), s = self.grid, self.waveft_spectrum
        grid = s.new_zeros(h * w).scatter(0, self.waveft_locations, s).view(h, w)
        if not self.use_idwt:
            return grid * self.scaling
        h2, w2 = h // 2, w // 2
        ca, ch, cv, cd = grid[:h2, :w2], grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:]
        ul, uh, vl, vh = self._u_lo, self._u_hi, self._v_lo, self._v_hi
        x = ul @ ca @ vl.T + uh @ ch @ vl.T + ul @ cv @ vh.T + uh @ cd @ vh.T
        return x[: self.out_features, : self.in_features] * self.scaling

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"n_frequency={self.n_frequency}", f"scaling={self.scaling:g}",
                                              f"use_idwt={self.use_idwt}"])


__all__ = ["WaveFTModule", "haar_synthesis"]
