"""OFT as one module that a graph pass calls at a linear site (PEFT 0.22 ``oft.Linear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = OFTModule(x, y, W, b) = y + (x R - x) W_rowsᵀ        (= linear(x R, W, b) alone)

``R = blockdiag(R_1 … R_r)`` [in, in]; ``R_i = I + 2S + 2S² + 2S³ + S⁴`` (Cayley–Neumann, 5 terms) or the exact
``(I - S)(I + S)⁻¹`` of ``S_i = U_i - U_iᵀ``, ``U_i`` the strict upper triangle filled from ``oft_R[i]``
(PEFT's ``oft_R.weight`` [r, b(b-1)/2], one row with ``block_share``). COFT projects each row onto the ball
``‖S_i‖_F ≤ eps/√r`` before use (value projected, gradient straight through; in training the projection is also
written back, as PEFT does). ``fold``: ``W' = W + W0 (Rᵀ - I)`` on the owned rows (``W0 Rᵀ`` alone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..transforms import InputTransformModule, cayley, cayley_neumann, skew_from_upper, upper_selector

__all__ = ["OFTModule", "adjust_blocks"]


def adjust_blocks(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (ties: the lower)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


class OFTModule(InputTransformModule):
    reads_base_weight = "OFT"

    def __init__(self, in_features: int, out_features: int, *, blocks: int, block_size: int, coft: bool = False,
                 eps: float = 6e-5, block_share: bool = False, use_cayley_neumann: bool = True,
                 num_cayley_neumann_terms: int = 5, fan_in_fan_out: bool = False, out_slice=None, total_out=None,
                 out_rows=None, dtype=None, device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.blocks, self.block_size = int(blocks), int(block_size)
        self.coft, self.eps, self.block_share = bool(coft), float(eps), bool(block_share)
        self.use_cayley_neumann, self.num_cayley_neumann_terms = bool(use_cayley_neumann), int(num_cayley_neumann_terms)
        n = block_size * (block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(1 if block_share else blocks, n, dtype=dtype, device=device))
        self.register_buffer("_upper", upper_selector(block_size).to(device=device), persistent=False)

    def _skew_params(self) -> Tensor:
        w = self.oft_R
        if not self.coft:
            return w
        # PEFT's _project_batch: ‖S‖_F = √2·‖vec‖ against eps / √(number of parameter rows)
        eps = self.eps / math.sqrt(w.shape[0])
        norm = torch.sqrt(2.0 * (w * w).sum(dim=1, keepdim=True))
        projected = torch.where(norm <= eps, w, eps * (w / norm))
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            with torch.no_grad():
                self.oft_R.copy_(projected)
        return w + (projected - w).detach()

    def rotations(self) -> Tensor:
        """``[blocks, b, b]`` (the shared block repeated with ``block_share``)."""
        s = skew_from_upper(self._skew_params(), self._upper, self.block_size)
        r = cayley_neumann(s, self.num_cayley_neumann_terms) if self.use_cayley_neumann else cayley(s)
        if self.block_share:
            r = r.expand(self.blocks, -1, -1)
        return r

    def transform_input(self, x: Tensor) -> Tensor:
        r = self.rotations()
        xr = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", xr, r).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, "
                f"block_size={self.block_size}" + (", coft=True" if self.coft else "")
                + (", block_share=True" if self.block_share else "")
                + ("" if self.use_cayley_neumann else ", exact Cayley"))
