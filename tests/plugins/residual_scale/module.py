"""Toy residual-point module implementing the residual-site protocol explicitly:

``pre(h, r, ln_w, ln_b) → (hidden, query, residual)``, ``core(hidden, residual) → (out, up)``,
``post(out, h, r, ln_w, ln_b) → residual point's output``; ``forward`` is ``post(core(pre(…)))``. Composition
blocks (``Stack``, ``Fuse``, ``Parallel``…) call the three steps themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphadapt.errors import SpecError


class ResidualScaleModule(nn.Module):
    mergeable = False
    merge_refusal = "residual_scale sits at a residual point (no weight to fold into)"

    def __init__(self, hidden: int, init: float, norm=None, dtype=None, device=None):
        super().__init__()
        if norm is not None and norm.kind != "layer_norm":
            raise SpecError(f"the residual_scale toy handles a LayerNorm after the add, not {norm.kind}", field="method")
        self.eps = norm.eps if norm is not None else None
        self.gain = nn.Parameter(torch.full((hidden,), float(init), dtype=dtype, device=device))
        self.active = True

    def pre(self, h, residual, ln_weight=None, ln_bias=None, query_before_ln=False):
        return h, h, residual

    def core(self, hidden, residual):
        up = hidden * self.gain
        return hidden + up, up

    def post(self, hidden, h, residual, ln_weight=None, ln_bias=None):
        out = hidden + residual
        if self.eps is None:       # pre-LN model: no norm after the add
            return out
        return F.layer_norm(out, (out.shape[-1],), ln_weight, ln_bias, self.eps)

    def forward(self, h, residual, ln_weight=None, ln_bias=None):
        if not self.active:
            return self.post(h, h, residual, ln_weight, ln_bias)
        x, _query, res = self.pre(h, residual, ln_weight, ln_bias)
        out, _up = self.core(x, res)
        return self.post(out, h, residual, ln_weight, ln_bias)
