"""VB-LoRA at one linear site (PEFT's ``vblora.Linear``), bank ``V`` [N, L]::

    mix(logits) = Σ_topk softmax(topk logits) · V[topk indices]           (over the last axis of the logits)
    A = mix(logits_A [r, in/L, N]).reshape(r, in)      B = mix(logits_B [out/L, r, N]).transpose(1, 2).reshape(out, r)
    y' = y + (dropout(x) Aᵀ) Bᵀ,   ΔW = B A

The bank is trainable and shared by the adapter's sites (:class:`VBLoRABank` at ``adapters.<name>.vblora_bank``;
PEFT's ``base_model.vblora_vector_bank``); ``vblora_logits_A``/``vblora_logits_B`` have PEFT's names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import SpecError
from graphadapt.methods.delta import DeltaSiteModule, SharedRef


class VBLoRABank(nn.Module):
    """The trainable vector bank shared by one VB-LoRA adapter's sites."""

    def __init__(self, num_vectors: int, vector_length: int, dtype=None, device=None):
        super().__init__()
        self.vblora_vector_bank = nn.Parameter(torch.zeros(num_vectors, vector_length, dtype=dtype, device=device))


def mix(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    top, idx = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


class VBLoRAModule(DeltaSiteModule):
    def __init__(self, site, bank: VBLoRABank, *, r: int, topk: int, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        self._init_delta(site, dropout)
        n, length = bank.vblora_vector_bank.shape
        if self.in_features % length or self.out_features % length:
            raise SpecError(f"VB-LoRA vector_length={length} must divide in={self.in_features} and "
                            f"out={self.out_features} at {site.name}", field="vector_length")
        self.r, self.topk = r, topk
        self._shared = SharedRef(bank)
        f = {"dtype": dtype, "device": device}
        self.vblora_logits_A = nn.Parameter(torch.zeros(r, self.in_features // length, n, **f))
        self.vblora_logits_B = nn.Parameter(torch.zeros(self.out_features // length, r, n, **f))

    def factors(self) -> tuple[Tensor, Tensor]:
        bank = self._shared.module.vblora_vector_bank
        a = mix(self.vblora_logits_A, bank, self.topk).reshape(self.r, -1)
        b = mix(self.vblora_logits_B, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return b @ a

    def delta_output(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        return F.linear(F.linear(x, a), b)

    def extra_repr(self) -> str:
        return ", ".join(self._site_repr() + [f"r={self.r}", f"topk={self.topk}"])


__all__ = ["VBLoRABank", "VBLoRAModule", "mix"]
