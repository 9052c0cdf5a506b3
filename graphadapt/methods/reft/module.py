"""ReFT intervention modules at a layer output: ``(h, attention_mask) → h'`` (the ``hidden`` site kind, point ``layer_output``).

before:  ``h`` [B, T, H], the hidden states a layer returns
after:   ``h'[b, t] = unit(h[b, t])`` where ``t`` is among the first ``prefix_positions`` or last
         ``suffix_positions`` real tokens of row ``b`` (``h[b, t]`` elsewhere), with
         ``unit(x) = dropout(x + (act(W x + b) − R x) R)`` (``− R x`` only with ``subtract_projection``)

Rows are located as AdapterHub does: the first real token is ``argmax(attention_mask)`` and the row holds
``sum(attention_mask == 1)`` tokens (no mask: the whole row). Positions are selected with masks (``where``), not
gathered and scattered, so the graph has no data-dependent shapes and exports as it is; a suffix position wins
where prefix and suffix overlap (AdapterHub writes the suffix last).

``R`` with ``orthogonality`` is torch's ``orthogonal`` parametrisation in its Householder map, written out in
plain ops (k = r reflections) so it traces and exports: with ``X = originalᵀ`` ([H, r]), ``A = tril(X, −1)``,
``τᵢ = 2 / (1 + ‖Aᵢ‖²)``, ``Q = H₁⋯H_r I[:, :r]`` (``Hᵢ = I − τᵢ vᵢvᵢᵀ``, ``vᵢ = Aᵢ + eᵢ``), scaled column-wise
by ``trunc(diag X)`` and rotated by the ``base`` buffer: ``R = (base · Q)ᵀ``. Training keeps R orthonormal exactly
as AdapterHub's parametrisation does (the diagonal of ``original`` gets no gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graphadapt.methods.activations import get_activation


class ReftUnit(nn.Module):
    """One intervention: ``x + (act(W x + b) − R x) R`` (then dropout)."""

    def __init__(self, hidden: int, r: int, orthogonal: bool, subtract_projection: bool, non_linearity: str | None,
                 dropout: float, generator: torch.Generator, dtype=None, device=None):
        super().__init__()
        self.orthogonal = orthogonal
        self.subtract_projection = subtract_projection
        self.non_linearity = non_linearity
        self.act = get_activation(non_linearity) if non_linearity is not None else None
        self.dropout = nn.Dropout(dropout)
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default init, drawn from the adapter's generator

        def uniform(*shape):
            return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

        self.learned_source = nn.Linear(hidden, r, dtype=dtype, device=device)
        with torch.no_grad():
            self.learned_source.weight.copy_(uniform(r, hidden))
            self.learned_source.bias.copy_(uniform(r))
        if orthogonal:
            # base: a seeded orthogonal matrix; original: diagonal −1, zeros below → R = base[:, :r]ᵀ at init
            q, rr = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))
            base = (q * torch.sign(torch.diagonal(rr))).to(dtype=dtype or torch.get_default_dtype())
            self.register_buffer("projection_base", base.to(device=device))
            original = torch.zeros(r, hidden, dtype=dtype, device=device)
            original[torch.arange(r), torch.arange(r)] = -1.0
            self.projection_original = nn.Parameter(original)
        else:
            self.projection_weight = nn.Parameter(uniform(r, hidden).to(dtype=dtype, device=device))

    def rotation(self) -> Tensor:
        """``R`` [r, H]."""
        if not self.orthogonal:
            return self.projection_weight
        x = self.projection_original.mT                      # [H, r], tall
        n, k = x.shape
        a = x.tril(-1)
        tau = 2.0 / (1.0 + (a * a).sum(dim=-2))
        eye = torch.eye(n, k, dtype=x.dtype, device=x.device)
        v = a + eye
        q = eye
        for i in range(k - 1, -1, -1):
            vi = v[:, i:i + 1]
            q = q - tau[i] * (vi @ (vi.mT @ q))
        q = q * torch.trunc(torch.diagonal(x).detach()).unsqueeze(-2)
        return (self.projection_base @ q).mT

    def forward(self, x: Tensor) -> Tensor:
        rot = self.rotation()
        source = self.learned_source(x)
        if self.act is not None:
            source = self.act(source)
        if self.subtract_projection:
            source = source - x @ rot.mT
        return self.dropout(x + source @ rot)


class ReftIntervention(nn.Module):
    """The interventions of one adapter at one layer output (one unit, or a prefix and a suffix unit)."""

    mergeable = False
    merge_refusal = "ReFT intervenes on hidden states at chosen positions (no weight to fold into)"

    def __init__(self, hidden: int, r: int, prefix_positions: int, suffix_positions: int, *, orthogonal: bool,
                 tied_weights: bool, subtract_projection: bool, non_linearity: str | None, dropout: float,
                 generator: torch.Generator, dtype=None, device=None):
        super().__init__()
        self.prefix_positions = int(prefix_positions)
        self.suffix_positions = int(suffix_positions)
        self.tied_weights = bool(tied_weights)
        self.units = nn.ModuleList(
            ReftUnit(hidden, r, orthogonal, subtract_projection, non_linearity, dropout, generator, dtype, device)
            for _ in range(1 if tied_weights else 2))
        self.active = True

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if not self.active:
            return h
        batch, length = h.shape[0], h.shape[1]
        pos = torch.arange(length, device=h.device).unsqueeze(0)          # [1, T]
        if attention_mask is None:
            start = torch.zeros(batch, 1, dtype=torch.long, device=h.device)
            end = torch.full((batch, 1), length, dtype=torch.long, device=h.device)
        else:
            real = attention_mask == 1
            start = real.to(torch.int32).argmax(dim=1, keepdim=True).to(torch.long)  # first real token
            end = start + real.sum(dim=-1, keepdim=True)
        out = h
        prefix_unit = self.units[0]
        suffix_unit = self.units[0] if self.tied_weights else self.units[1]
        done = {}
        if self.prefix_positions:
            sel = (pos >= start) & (pos < start + self.prefix_positions)
            done[0] = prefix_unit(h)
            out = torch.where(sel.unsqueeze(-1), done[0], out)
        if self.suffix_positions:
            sel = (pos >= end - self.suffix_positions) & (pos < end)
            new = done[0] if self.tied_weights and 0 in done else suffix_unit(h)
            out = torch.where(sel.unsqueeze(-1), new, out)
        return out


__all__ = ["ReftIntervention", "ReftUnit"]
