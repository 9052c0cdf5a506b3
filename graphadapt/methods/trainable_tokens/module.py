"""Trainable tokens: one module standing in for an embedding matrix wherever the graph reads it.

    before:  embedding(E, ids)  …  linear(h, E)          (tied LM head)
    after:   embedding(M(E), ids) … linear(h, M(E)),     M(E) = E.index_copy(0, token_indices, delta)

``delta = trainable_tokens_delta`` [n, H] (PEFT's name and shape); the other rows stay the base rows, read live.
``fold_parameter`` (merge) writes the rows into a new matrix, which every reader (a tied head too) then reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TrainableTokensModule"]


class TrainableTokensModule(nn.Module):
    mergeable = True
    merge_refusal = None

    def __init__(self, token_indices, rows: Tensor):
        super().__init__()
        self.active = True
        self.register_buffer("_index", torch.tensor(token_indices, dtype=torch.long, device=rows.device),
                             persistent=False)
        self.trainable_tokens_delta = nn.Parameter(rows.detach().clone())

    def forward(self, p: Tensor, name: str = "weight") -> Tensor:
        if not self.active:
            return p
        return p.index_copy(0, self._index, self.trainable_tokens_delta.to(p.dtype))

    @torch.no_grad()
    def fold_parameter(self, p: Tensor, name: str = "weight") -> Tensor:
        """The embedding matrix with the trained rows written in (new tensor; PEFT's merge)."""
        return p.detach().index_copy(0, self._index.to(p.device), self.trainable_tokens_delta.detach().to(p))

    def extra_repr(self) -> str:
        return f"tokens={self._index.tolist()}, width={self.trainable_tokens_delta.shape[1]}"
