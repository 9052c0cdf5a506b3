"""LoRA on fused expert weights: one low-rank update per expert of a 3-d ``W[E, out, in]``.

Transform (one expert site; rows of ``x`` sorted by expert, ``routing`` = cumulative row offsets)::

    before:  y  = grouped_mm(x, W[e]ᵀ …, offsets)             y[s] = W[e(s)] x[s]
    after:   y' = ExpertLoRAModule(x, y, W, None, offsets)    y'[s] = y[s] + s·B[e(s)] A[e(s)] x[s]

computed with two matmuls for all experts at once: ``h = x A_allᵀ`` ([S, E·r]), zeroed outside the
row's expert block (a one-hot mask: exact, no arithmetic on other experts' values), then ``h B_allᵀ``.

Parameter layout is PEFT's for ``target_parameters`` (``ParamWrapper``): ``lora_A`` [E·r, in]
expert-major (rows ``e·r … e·r+r-1``), ``lora_B`` [out, r·E] rank-major (column ``k·E + e``), so
PEFT checkpoints load 1:1. ``fold`` adds ``s·B[e]A[e]`` to every expert's rows (or the ``out_slice``
of a fused ``gate_up``) of the 3-d weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.init import init_bert_, kaiming_uniform_, normal_, zeros_
from graphadapt.passes.experts import expert_onehot

__all__ = ["ExpertLoRAModule"]


class ExpertLoRAModule(nn.Module):
    """Per-expert LoRA of one fused expert weight ``(x, y, W, b, routing) → y'`` (see module docstring)."""

    mergeable = True
    merge_refusal = None

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, r: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, transposed: bool = False,
                 out_slice: tuple[int, int] | None = None, total_out: int | None = None, dtype=None, device=None):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise SpecError(f"LoRA rank r must be a positive int, got {r!r}", field="r")
        self.active = True
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.transposed = bool(transposed)   # W[e] stored [in, out]
        self.total_out = total_out or out_features
        self.out_slice = None if out_slice is None or tuple(out_slice) == (0, self.total_out) else tuple(out_slice)
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.zeros(num_experts * r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * num_experts, **factory))
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()

    @torch.no_grad()
    def init_(self, scheme: str, generator: torch.Generator) -> None:
        """``lora`` (A kaiming-uniform as PEFT's ``nn.Linear(in, r·E)``, B = 0), ``gaussian`` or ``bert``."""
        if scheme == "lora":
            kaiming_uniform_(self.lora_A, math.sqrt(5), generator)
            zeros_(self.lora_B)
        elif scheme == "gaussian":
            normal_(self.lora_A, 1.0 / self.r, generator)
            zeros_(self.lora_B)
        elif scheme == "bert":
            init_bert_(self.lora_A, generator)
            init_bert_(self.lora_B, generator)
        else:
            raise SpecError(f"LoRA init {scheme!r} is not available on expert weights (use lora, gaussian or bert)",
                            field="init")

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A`` [E, r, in] and ``B`` [E, out, r] per expert."""
        a = self.lora_A.view(self.num_experts, self.r, self.in_features)
        b = self.lora_B.view(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        return a, b

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None,
                routing: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        rows = x.shape[0]
        h = F.linear(self.dropout(x), self.lora_A)                                   # [S, E·r] expert-major
        mask = expert_onehot(routing, rows, h.dtype)                                 # [S, E]
        h = h.view(rows, self.num_experts, self.r) * mask.unsqueeze(-1)
        h = h.transpose(1, 2).reshape(rows, self.r * self.num_experts)               # rank-major, as lora_B
        delta = F.linear(h, self.lora_B) * self.scaling
        if self.out_slice is None:
            return y + delta.to(y.dtype)
        s0, s1 = self.out_slice
        parts = ([y[..., :s0]] if s0 > 0 else []) + [y[..., s0:s1] + delta.to(y.dtype)]
        if s1 < self.total_out:
            parts.append(y[..., s1:])
        return torch.cat(parts, dim=-1)

    def delta_weight(self) -> Tensor:
        """``s·B[e]A[e]`` as [E, out, in]."""
        a, b = self.factors()
        return torch.bmm(b, a) * self.scaling

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(W[E, ·, ·], b) → (W', b)`` with each expert's rows (its slice of a fused weight) plus ``s·B[e]A[e]``."""
        new = weight.detach().clone()
        delta = self.delta_weight().to(dtype=weight.dtype, device=weight.device)
        s0, s1 = self.out_slice or (0, self.total_out)
        if self.transposed:
            new[:, :, s0:s1] += delta.transpose(1, 2)
        else:
            new[:, s0:s1, :] += delta
        return new, None if bias is None else bias.detach().clone()

    def extra_repr(self) -> str:
        s = (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
             f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}")
        return s + (f", out_slice={self.out_slice}, total_out={self.total_out}" if self.out_slice else "")
