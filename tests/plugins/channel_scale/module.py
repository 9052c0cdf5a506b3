"""Toy module: ``(x, y, W, b) → (1 + s) ⊙ y`` on the channels it owns, foldable into ``W`` and ``b``.

Subclassing :class:`~graphadapt.methods.sliced.SlicedSiteModule` is all it takes to work on a fused projection
(GPT-2's ``c_attn``: one site per q/k/v slice, ``out_slice``; GPT-NeoX's head-interleaved QKV: ``out_rows``):
``_own(y)`` reads this module's channels, ``_replace_slice(y, new)`` writes them back (the other channels stay
bit-identical), and ``fold`` updates its rows of the full weight through ``_rows``/``_commit_rows``.
"""

from __future__ import annotations

import torch
from torch import nn

from graphadapt.methods.sliced import SlicedSiteModule


class ChannelScaleModule(SlicedSiteModule):
    mergeable = True
    merge_refusal = None
    reads_base_weight = None

    def __init__(self, in_features: int, out_features: int, *, fan_in_fan_out: bool, init: float,
                 out_slice=None, total_out=None, out_rows=None, dtype=None, device=None):
        super().__init__()
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.scale = nn.Parameter(torch.full((out_features,), float(init), dtype=dtype, device=device))
        self.active = True

    def forward(self, x, y, weight, bias=None):
        if not self.active:
            return y
        return self._replace_slice(y, self._own(y) * (1 + self.scale))

    @torch.no_grad()
    def fold(self, weight, bias=None):
        f = 1 + self.scale.detach()
        w = weight.detach().clone()
        rows = self._rows(w)                       # [out_features, in] view (or gathered copy) of my rows
        rows.mul_(f[:, None].to(rows.dtype))
        self._commit_rows(w, rows)
        if bias is None:
            return w, None
        b = bias.detach().clone()
        part = self._bias_slice(b)
        part.mul_(f.to(part.dtype))
        self._commit_bias(b, part)
        return w, b
