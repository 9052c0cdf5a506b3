"""AdapterFusion (Pfeiffer et al., 2021) as one module per site.

    scores = softmax( (Q query) · (K keyᵢ)ᵀ / T )  over children i      (dropout on the scores)
    out    = V(Σᵢ scoresᵢ · valueᵢ)  (or Σᵢ scoresᵢ · V valueᵢ)  + residual

``query [B, T, H]``, ``key``/``value [B, T, N, H]`` (N children). Numerically AdapterHub 1.3's
``BertFusion`` (including ``temperature``: T starts at 50 and drops by 0.05 per call, floor 1;
``value_initialized``: V = I + 1e-6 off-diagonal; ``residual_before``: the residual is added to
every value), with seeded, isolated init (query/key/value weights N(0, 0.02²), biases 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..init import normal_


class FusionLayer(nn.Module):
    def __init__(self, hidden: int, config: dict, dropout: float, generator: torch.Generator, dtype=None,
                 device=None):
        super().__init__()
        self.hidden = hidden
        self.config = dict(config)
        self.dropout_p = float(dropout)
        kw = dict(dtype=dtype, device=device)
        if not (config["query"] or config["key"] or config["value"]):
            self.dense = nn.Linear(hidden, 1, **kw)  # AdapterHub creates it and never uses it
            with torch.no_grad():
                normal_(self.dense.weight, 0.02, generator)
                self.dense.bias.zero_()
        if config["query"]:
            self.query = nn.Linear(hidden, hidden, **kw)
        if config["key"]:
            self.key = nn.Linear(hidden, hidden, **kw)
        if config["value"]:
            self.value = nn.Linear(hidden, hidden, bias=False, **kw)
        with torch.no_grad():  # draw order: query, key, value (each weight; biases zero)
            for name in ("query", "key", "value"):
                lin = getattr(self, name, None)
                if lin is not None:
                    normal_(lin.weight, 0.02, generator)
                    if lin.bias is not None:
                        lin.bias.zero_()
            if config["value"] and config["value_initialized"]:
                w = torch.full((hidden, hidden), 1e-6, dtype=torch.float32)
                w.fill_diagonal_(1.0)
                self.value.weight.copy_(w)
        self.register_buffer("T", torch.tensor(50.0 if config["temperature"] else 1.0), persistent=False)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, residual: Tensor) -> Tensor:
        cfg = self.config
        if cfg["residual_before"]:
            value = value + residual[:, :, None, :]
        q = self.query(query) if cfg["query"] else query
        k = self.key(key) if cfg["key"] else key
        v = self.value(value) if cfg["value"] and cfg["value_before_softmax"] else value
        scores = torch.squeeze(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)), dim=2)
        scores = F.dropout(scores, self.dropout_p, self.training)
        probs = torch.softmax(scores / self.T, dim=-1)
        if cfg["temperature"]:
            with torch.no_grad():
                self.T.fill_(max(float(self.T) - 50.0 / 1000.0, 1.0))
        ctx = torch.squeeze(torch.matmul(probs.unsqueeze(2), v), dim=2)
        if cfg["value"] and not cfg["value_before_softmax"]:
            ctx = self.value(ctx)
        if not cfg["residual_before"]:
            ctx = ctx + residual
        return ctx

    def regularization(self) -> Tensor | None:
        """AdapterHub's ``0.01·‖I − V‖²`` for a trainable value matrix (None otherwise)."""
        v = getattr(self, "value", None)
        if v is None or not v.weight.requires_grad or not self.config.get("regularization"):
            return None
        eye = torch.eye(self.hidden, dtype=v.weight.dtype, device=v.weight.device)
        return 0.01 * (eye - v.weight).pow(2).sum()


__all__ = ["FusionLayer"]
