"""Trainable tokens spec (PEFT ``TrainableTokensConfig`` / ``trainable_token_indices``).

    E = embedding matrix [V, H]  →  E' = E with rows ``token_indices`` replaced by trainable rows

wherever the graph reads ``E``: the input lookup and, when the output embeddings are tied to it, the LM head — so
tied output embeddings follow. The embedding is found by pattern on the graph (the ``aten.embedding`` lookup of
``input_ids``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, check_bool, is_int, register_method, spec_field


@register_method
@dataclass(frozen=True)
class TrainableTokens(MethodSpec):
    """Train selected embedding rows only (PEFT semantics)."""

    method: ClassVar[str] = "trainable_tokens"

    token_indices: tuple[int, ...] = spec_field((), help="Vocabulary rows that train (distinct ints >= 0).")
    targets: tuple[str, ...] = spec_field((), help="Embedding module-path selectors; empty: the lookup of "
                                          "input_ids found in the graph.")
    init_weights: bool = spec_field(True, help="True: the rows start as the base rows (no change at init, PEFT's "
                                    "default); False: standard normal draws.")

    def __post_init__(self) -> None:
        super().__post_init__()
        idx = self.token_indices
        if isinstance(idx, Mapping) or not isinstance(idx, Iterable) or not all(is_int(i) and i >= 0 for i in idx):
            raise SpecError(f"token_indices must be a list of ints >= 0, got {self.token_indices!r}",
                            field="token_indices")
        idx = tuple(int(i) for i in idx)
        if not idx or len(set(idx)) != len(idx):
            raise SpecError(f"token_indices must be a non-empty list of distinct rows, got {list(idx)}",
                            field="token_indices")
        object.__setattr__(self, "token_indices", idx)
        t = (self.targets,) if isinstance(self.targets, str) else self.targets
        if isinstance(t, Mapping) or not isinstance(t, Iterable) or not all(isinstance(s, str) and s for s in t):
            raise SpecError(f"targets must be a list of module-path selectors, got {self.targets!r}", field="targets")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(t)))
        object.__setattr__(self, "init_weights", check_bool("init_weights", self.init_weights))


__all__ = ["TrainableTokens"]
