"""IA3 on fused expert weights: one scaling vector per expert of a 3-d ``W[E, out, in]``.

Transform (one expert site; rows of ``x`` sorted by expert, ``routing`` = cumulative row offsets)::

    output scaling:      y'[s] = l[e(s)] ⊙ y[s]                              ia3_l [E, out]
    feedforward scaling: y'[s] = W[e(s)] (l[e(s)] ⊙ x[s])  (= y + W[e](x ⊙ (l[e] - 1)))   ia3_l [E, in]

The per-row vector is ``onehot(e(s)) @ ia3_l`` (exact: one product with 1, the rest zeros); the
feedforward form computes ``x ⊙ (l - 1)`` through every expert's weight and keeps each row's own
expert (E dense products, as the export lowering). ``fold`` scales each expert's rows (output) or
input columns (feedforward) of the 3-d weight, within the site's ``out_slice``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.passes.experts import expert_ids, expert_onehot

__all__ = ["ExpertIA3Module"]


class ExpertIA3Module(nn.Module):
    """Per-expert IA3 of one fused expert weight ``(x, y, W, b, routing) → y'`` (see module docstring)."""

    mergeable = True
    merge_refusal = None

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, feedforward: bool,
                 transposed: bool = False, out_slice=None, total_out: int | None = None, dtype=None, device=None):
        super().__init__()
        self.active = True
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.feedforward, self.transposed = bool(feedforward), bool(transposed)
        self.total_out = total_out or out_features
        self.out_slice = None if out_slice is None or tuple(out_slice) == (0, self.total_out) else tuple(out_slice)
        width = in_features if self.feedforward else out_features
        self.ia3_l = nn.Parameter(torch.ones(num_experts, width, dtype=dtype, device=device))

    def _rows(self, weight: Tensor) -> Tensor:
        """[E, out, in] view of this module's rows of the 3-d weight (writes through)."""
        w = weight.transpose(1, 2) if self.transposed else weight
        s0, s1 = self.out_slice or (0, self.total_out)
        return w[:, s0:s1, :]

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None,
                routing: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        s0, s1 = self.out_slice or (0, self.total_out)
        own = y[..., s0:s1]
        rows = x.shape[0]
        if not self.feedforward:
            scale = expert_onehot(routing, rows, self.ia3_l.dtype) @ self.ia3_l
            mid = own * scale.to(y.dtype)
        else:
            xs = (x.to(self.ia3_l.dtype) * (expert_onehot(routing, rows, self.ia3_l.dtype) @ (self.ia3_l - 1)))
            ids = expert_ids(routing, rows).unsqueeze(-1)
            w = self._rows(weight).to(self.ia3_l.dtype)
            delta = None
            for e in range(self.num_experts):
                d = xs @ w[e].t()
                delta = d if delta is None else torch.where(ids == e, d, delta)
            mid = own + delta.to(y.dtype)
        if self.out_slice is None:
            return mid
        parts = ([y[..., :s0]] if s0 > 0 else []) + [mid] + ([y[..., s1:]] if s1 < self.total_out else [])
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, *,
             base_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Output scaling: each expert's rows times ``l[e]``. Feedforward: adds ``W0[e] ⊙ (l[e] - 1)`` on the
        input columns (``W0`` = ``base_weight``, the unmerged weight the forward reads), so updates of
        earlier adapters already folded into ``weight`` are kept, as the forward keeps them."""
        new = weight.detach().clone()
        rows = self._rows(new)
        l = self.ia3_l.to(dtype=weight.dtype, device=weight.device)
        if self.feedforward:
            base = self._rows(weight if base_weight is None else base_weight).to(weight.dtype)
            rows.add_(base * (l - 1).unsqueeze(1))
        else:
            rows.mul_(l.unsqueeze(2))
        return new, None if bias is None else bias.detach().clone()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.feedforward}" + (f", out_slice={self.out_slice}" if self.out_slice else ""))
