"""VeRA / DVoRA modules in AdapterHub's form at a linear site: ``(x, y, W, b) → y'``.

before: ``y = x Wᵀ + b``
after:  ``y' = y + s · x ΔWᵀ``, ``ΔW = Λ_b B Λ_d A`` (``s = alpha / r``, or the gate ``mean_seq σ(x Gᵀ + g)``);
        DVoRA: ``y' = m / ‖W + ΔW‖_row ⊙ (y + s · x ΔWᵀ)`` (AdapterHub: unscaled ΔW in the norm, bias rescaled too).

``A``, ``B`` live in one :class:`SharedProjections` per adapter (buffers: frozen, saved with the adapter) that every
site's module reads. Mergeable: ``W' = W + sΔW`` (DVoRA: ``W' = f ⊙ (W + sΔW)``, ``b' = f ⊙ b`` with
``f = m / ‖W₀ + ΔW‖``); gated modules are not (the gate depends on the input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SharedProjections(nn.Module):
    """The frozen random ``A`` [r, in] and ``B`` [out, r] of one adapter (buffers)."""

    def __init__(self, r: int, in_features: int, out_features: int, init: str, seed: int | None,
                 generator: torch.Generator, dtype=None, device=None):
        super().__init__()
        a = torch.zeros(r, in_features)
        b = torch.zeros(out_features, r)
        if seed is not None:  # AdapterHub's fix_seed(init_weights_seed), then A, then B on the global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _draw(a, b, init, None)
        else:
            _draw(a, b, init, generator)
        self.register_buffer("proj_A", a.to(dtype=dtype, device=device))
        self.register_buffer("proj_B", b.to(dtype=dtype, device=device))


def _draw(a: Tensor, b: Tensor, init: str, generator: torch.Generator | None) -> None:
    if init == "vera":
        nn.init.kaiming_uniform_(a, generator=generator)
        nn.init.kaiming_uniform_(b, generator=generator)
    elif init == "bert":
        nn.init.normal_(a, std=0.02, generator=generator)
        nn.init.normal_(b, std=0.02, generator=generator)
    else:  # "lora"
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(b)


class VeraHubModule(nn.Module):
    out_slice = None       # whole (non-fused) sites only; read by the AdapterHub LoRA-format loader
    out_rows = None

    def __init__(self, shared: SharedProjections, in_features: int, out_features: int, *, r: int, alpha: float,
                 d_init: float, b_init: float, dropout: float, magnitude: bool, use_gating: bool,
                 generator: torch.Generator, dtype=None, device=None):
        super().__init__()
        self.shared = [shared]          # a list: not a submodule of every site (saved once, under the adapter)
        self.in_features, self.out_features = in_features, out_features
        self.total_out = out_features
        self.scaling = alpha / r
        self.rescales, self.gated = magnitude, use_gating
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        f = dict(dtype=dtype, device=device)
        self.vera_D = nn.Parameter(torch.eye(r, **f) * d_init)
        self.vera_B = nn.Parameter(torch.eye(out_features, **f) * b_init)
        self.m = nn.Linear(1, out_features, bias=False, **f) if magnitude else None   # set from W by init_magnitude_
        if use_gating:
            self.gate = nn.Linear(in_features, 1, **f)
            with torch.no_grad():
                self.gate.weight.copy_(torch.randn(self.gate.weight.shape, generator=generator) * 0.02)
                self.gate.bias.zero_()
        else:
            self.gate = None
        self.active = True

    # -- protocol facts
    @property
    def mergeable(self) -> bool:
        return self.gate is None

    @property
    def merge_refusal(self) -> str | None:
        return "gated VeRA depends on the input (its gate)" if self.gate is not None else None

    @property
    def reads_base_weight(self) -> str | None:
        return "DVoRA" if self.rescales else None

    def delta(self) -> Tensor:
        """``ΔW = Λ_b B Λ_d A`` [out, in] (unscaled)."""
        sp = self.shared[0]
        return self.vera_B @ sp.proj_B @ self.vera_D @ sp.proj_A

    def _factor(self, weight: Tensor, delta: Tensor) -> Tensor:
        return self.m.weight.view(-1) / torch.linalg.vector_norm(weight + delta, dim=1)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        delta = self.delta()
        h = F.linear(self.dropout(x), delta)
        if self.gate is not None:
            h = h * torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)
        else:
            h = h * self.scaling
        if self.rescales:
            return self._factor(weight, delta) * (y + h)
        return y + h

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, base_weight: Tensor | None = None):
        delta = self.delta().to(weight.dtype)
        new_w = weight + self.scaling * delta
        if not self.rescales:
            return new_w, None if bias is None else bias.clone()
        f = self._factor(base_weight if base_weight is not None else weight, delta)
        return f.unsqueeze(1) * new_w, None if bias is None else f * bias

    @torch.no_grad()
    def init_magnitude_(self, weight: Tensor) -> None:
        """``m = ‖W‖_row`` (AdapterHub's init), so the rescaling starts at 1 for a zero ``Λ_b``."""
        self.m.weight.copy_(torch.linalg.vector_norm(weight, dim=1).unsqueeze(1).to(self.m.weight.dtype))

    def adapterhub_tensors(self) -> dict[str, nn.Parameter]:
        """AdapterHub tensor names (``loras.<name>.<key>``) → ours."""
        out = {"vera_D": self.vera_D, "vera_B": self.vera_B}
        if self.m is not None:
            out["m.weight"] = self.m.weight
        if self.gate is not None:
            out.update({"gate.weight": self.gate.weight, "gate.bias": self.gate.bias})
        return out


__all__ = ["SharedProjections", "VeraHubModule"]
