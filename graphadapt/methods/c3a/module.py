"""C3A at one linear site (PEFT's ``C3ALinear``)::

    y' = y + BCC(x, K) / in,   BCC: output block i = Σ_j circ(K[i, j]) x_j,   circ(k)[p, q] = k[(q − p) mod b]

i.e. ``ΔW = blocks(circ(K[i, j])) / in`` [out, in]. PEFT evaluates it with FFTs (``fft(ifft(x)·fft(k))``); here the
circulant blocks are gathered from the kernel with a fixed index table (real arithmetic: exportable, and the same map
up to float rounding). ``c3a_kernel`` [out/b, in/b, b] has PEFT's name and shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule


class C3AModule(DeltaSiteModule):
    def __init__(self, site, *, block_size: int, dtype=None, device=None):
        super().__init__()
        self._init_delta(site)
        b = block_size
        if self.in_features % b or self.out_features % b:
            raise SpecError(f"C3A block_size={b} must divide in={self.in_features} and out={self.out_features} at "
                            f"{site.name}", field="block_size")
        self.block_size = b
        self.c3a_kernel = nn.Parameter(torch.zeros(self.out_features // b, self.in_features // b, b, dtype=dtype,
                                                   device=device))
        p = torch.arange(b)
        self.register_buffer("_circulant", (p.unsqueeze(0) - p.unsqueeze(1)) % b, persistent=False)  # [p, q]

    def delta_weight(self) -> Tensor:
        k = self.c3a_kernel
        m, n, b = k.shape
        blocks = k[:, :, self._circulant]                       # [m, n, b(p), b(q)]
        return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / self.in_features

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"block_size={self.block_size}"])


__all__ = ["C3AModule"]
