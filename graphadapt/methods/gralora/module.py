"""GraLoRA at one linear site (PEFT's ``gralora.Linear``), ``k`` blocks per side, ``s = r/k``::

    A [k, in/k, r] (per input block n, columns grouped by output block j: A[n, :, j·s:(j+1)·s])
    B [k, r, out/k] (per output block j, rows grouped by input block n: B[j, n·s:(n+1)·s, :])
    ΔW block (j, n) = B[j, n-group]ᵀ A[n, :, j-group]ᵀ;   ΔW = scaling · (blocks + B_g A_g);   y' = y + dropout(x) ΔWᵀ

``B_g A_g`` is the optional hybrid LoRA (``gralora_A_general`` [hybrid_r, in], ``gralora_B_general`` [out, hybrid_r]).
PEFT's forward routes ``x`` through the same blocks with two einsums; the map is the same. Names and shapes are
PEFT's (``<path>.gralora_A``, ``.gralora_B``, ``.gralora_A_general.weight``, ``.gralora_B_general.weight``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule


class GraLoRAModule(DeltaSiteModule):
    def __init__(self, site, *, r: int, k: int, alpha: float, hybrid_r: int = 0, dropout: float = 0.0, dtype=None,
                 device=None):
        super().__init__()
        self._init_delta(site, dropout)
        if self.in_features % k or self.out_features % k:
            raise SpecError(f"GraLoRA k={k} must divide in={self.in_features} and out={self.out_features} at "
                            f"{site.name}", field="k")
        self.r, self.k, self.hybrid_r = r, k, hybrid_r
        self.scaling = float(alpha) / (r + hybrid_r)
        f = {"dtype": dtype, "device": device}
        self.gralora_A = nn.Parameter(torch.zeros(k, self.in_features // k, r, **f))
        self.gralora_B = nn.Parameter(torch.zeros(k, r, self.out_features // k, **f))
        if hybrid_r:
            self.gralora_A_general = nn.Parameter(torch.zeros(hybrid_r, self.in_features, **f))
            self.gralora_B_general = nn.Parameter(torch.zeros(self.out_features, hybrid_r, **f))
        else:
            self.register_parameter("gralora_A_general", None)
            self.register_parameter("gralora_B_general", None)

    def delta_weight(self) -> Tensor:
        k, s = self.k, self.r // self.k
        a = self.gralora_A.view(k, self.in_features // k, k, s)        # [n, i, j, s]
        b = self.gralora_B.view(k, k, s, self.out_features // k)       # [j, n, s, o]
        delta = torch.einsum("jnso,nijs->joni", b, a).reshape(self.out_features, self.in_features)
        if self.gralora_A_general is not None:
            delta = delta + self.gralora_B_general @ self.gralora_A_general
        return delta * self.scaling

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}", f"k={self.k}", f"hybrid_r={self.hybrid_r}",
                                              f"scaling={self.scaling:g}"])


__all__ = ["GraLoRAModule"]
