"""BOFT as one module that a graph pass calls at a linear site (PEFT 0.22 ``boft.Linear`` semantics).

    before:  y  = linear(x, W, b)
    after:   y' = BOFTModule(x, y, W, b) = s ⊙ (y - b + (x M - x) W_rowsᵀ) + b     (= s ⊙ (x M Wᵀ) + b alone)

``M = M_{N-1} ⋯ M_0``, ``M_i = P_i blockdiag(Q_i1 … Q_iD) P_iᵀ`` with ``Q = (I - A)(I + A)⁻¹``,
``A = ½(R - Rᵀ)`` of ``boft_R`` [N, D, H, H], ``P_i`` PEFT's block-butterfly permutations (identity for ``N = 1``),
``s = boft_s`` [out, 1]. ``fold``: ``W' = s ⊙ (W + W0 (Mᵀ - I))`` on the owned rows; the bias is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import InputTransformModule, cayley

__all__ = ["BOFTModule", "butterfly_permutation"]


def butterfly_permutation(n: int, blocks: int, half_block: int, extra_factors: int) -> Tensor:
    """PEFT's ``block_butterfly_perm(n, b, r, n_butterfly_factor)``: indices ``idx`` with
    ``P = perm2mat(idx)`` (``P[i, idx[i]] = 1``)."""
    if extra_factors == 0:
        return torch.arange(n)
    if blocks * half_block * 2 > n:
        raise ValueError("invalid number of butterfly blocks")
    size = n // blocks
    step = size / half_block
    order = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    initial = torch.arange(size)
    sorted_order = torch.empty(size, dtype=torch.long)
    for i, pos in enumerate(order):
        sorted_order[int(i * half_block): int(i * half_block + half_block)] = \
            initial[int(pos * half_block): int(pos * half_block + half_block)]
    idx = torch.arange(n)
    for i in range(0, n, size):
        idx[i:i + size] = idx[i:i + size][sorted_order]
    return idx


class BOFTModule(InputTransformModule):
    reads_base_weight = "BOFT"

    def __init__(self, in_features: int, out_features: int, *, factors: int, block_num: int, block_size: int,
                 fan_in_fan_out: bool = False, out_slice=None, total_out=None, out_rows=None, dtype=None, device=None):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.factors, self.block_num, self.block_size = int(factors), int(block_num), int(block_size)
        self.boft_R = nn.Parameter(torch.zeros(factors, block_num, block_size, block_size, dtype=dtype, device=device))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1, dtype=dtype, device=device))
        perms = torch.stack([butterfly_permutation(in_features, block_num // 2 ** i, block_size // 2, factors - 1)
                             for i in range(factors)])
        self.register_buffer("_perm", perms.to(device=device), persistent=False)
        self.register_buffer("_block_eye", torch.eye(block_num, dtype=dtype, device=device), persistent=False)

    def butterfly(self) -> Tensor:
        """``M`` [in, in]."""
        n, d, h, _ = self.boft_R.shape
        r = self.boft_R.reshape(n * d, h, h)
        q = cayley(0.5 * (r - r.transpose(1, 2))).reshape(n, d, h, h)
        eye = self._block_eye.to(q.dtype)
        # blockdiag as a product with the identity (exact: one non-zero term per entry), for export
        bd = (eye[None, :, None, :, None] * q[:, :, :, None, :]).reshape(n, d * h, d * h)
        mats = [bd[i].index_select(0, self._perm[i]).index_select(1, self._perm[i]) for i in range(n)]
        m = mats[0]
        for i in range(1, n):
            m = mats[i] @ m
        return m

    def transform_input(self, x: Tensor) -> Tensor:
        return x @ self.butterfly()

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        dt = self.boft_s.dtype
        x = x.to(dt)
        own = self._own(y).to(dt) + F.linear(self.transform_input(x) - x, self._rows(weight).to(dt))
        s = self.boft_s.reshape(-1)
        if bias is None:
            return self._replace_slice(y, own * s)
        b = self._bias_slice(bias).to(dt)
        return self._replace_slice(y, (own - b) * s + b)

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, *,
             base_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        new, b = super().fold(weight, bias, base_weight=base_weight)
        rows = self._rows(new)
        rows.mul_(self.boft_s.to(rows.dtype))
        self._commit_rows(new, rows)
        return new, b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, factors={self.factors}, "
                f"block_num={self.block_num}, block_size={self.block_size}")
