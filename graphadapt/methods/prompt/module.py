"""The prompt-tuning module, called at several nodes of the graph (see :mod:`graphadapt.passes.embedding`).

    M(ids,  "pad_ids")  = [0]*P ++ ids          [B, T] → [B, P+T]
    M(mask, "pad_mask") = [1]*P ++ mask         [B, T] → [B, P+T]   (the prompt is always attended)
    M(E,    "embed")    = [prompt ; E]          [B, T, H] → [B, P+T, H]
                          [E[:, :1] ; prompt ; E[:, 1:]]  with combine="prefix_after_bos"

Inactive, every call returns its input: the graph runs on the original length again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PromptTuningModule"]


class PromptTuningModule(nn.Module):
    """``prompt_embeddings`` [P, H] (PEFT's ``prompt_embeddings``, AdapterHub's ``prompt_embedding.weight``)."""

    mergeable = False
    merge_refusal = "prompt tuning adds tokens to the input; it stays in the graph"

    def __init__(self, length: int, hidden: int, combine: str = "prefix", *, dtype=None, device=None):
        super().__init__()
        self.length = int(length)
        self.combine = combine
        self.active = True
        self.prompt_embeddings = nn.Parameter(torch.zeros(length, hidden, dtype=dtype, device=device))

    def prompt(self) -> Tensor:
        """The ``[P, H]`` prompt (P-tuning computes it with its encoder)."""
        return self.prompt_embeddings

    def forward(self, x: Tensor, what: str) -> Tensor:
        if not self.active:
            return x
        if what == "embed":
            p = self.prompt().to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            if self.combine == "prefix_after_bos":
                return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
            return torch.cat([p, x], dim=1)
        fill = 1 if what == "pad_mask" else 0
        return torch.cat([x.new_full((x.shape[0], self.length), fill), x], dim=1)

    def extra_repr(self) -> str:
        return f"prompt_length={self.length}, hidden={self.prompt_embeddings.shape[1]}, combine={self.combine!r}"
