"""P-tuning (Liu et al., 2021; PEFT's ``P_TUNING`` / ``PromptEncoder``): the soft prompt is the output of a small
trainable encoder run on learned token embeddings, recomputed at every forward; placed like prompt tuning.

    prompt = MLP(E)                         E [P, H] (PEFT's ``embedding.weight``), MLP: H→h→h→H with ReLU
    prompt = MLP₂(BiLSTM(E))                LSTM: ``encoder_num_layers`` bidirectional layers of width h, MLP₂: 2h→2h→H

PEFT saves P-tuning checkpoints in inference form — the encoder's *output* as ``prompt_embeddings`` — so they
import as plain prompt tuning with exactly PEFT's outputs (:func:`peft_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.spec.base import MethodSpec, check_choice, check_int, check_real, register_method, spec_field

from .module import PromptTuningModule
from .spec import COMBINES, INSERT_AT, PromptTuning

ENCODERS = ("MLP", "LSTM")


@register_method
@dataclass(frozen=True)
class PTuning(MethodSpec):
    """Soft prompt produced by a trainable prompt encoder (PEFT's ``PromptEncoderConfig``)."""

    method: ClassVar[str] = "p_tuning"

    prompt_length: int = spec_field(10, help="Number of virtual tokens (PEFT's num_virtual_tokens).")
    encoder_type: str = spec_field("MLP", help="Prompt encoder: 'MLP' (3 linear layers, ReLU) or 'LSTM' "
                                   "(bidirectional LSTM, then a 2-layer MLP).")
    encoder_hidden_size: int | None = spec_field(None, help="Encoder width h; None: the embedding width.")
    encoder_num_layers: int = spec_field(2, help="LSTM layers (the MLP always has 3 linear layers, as PEFT).")
    encoder_dropout: float = spec_field(0.0, help="Dropout between LSTM layers, in [0, 1).")
    combine: str = spec_field("prefix", help="As PromptTuning.combine.")
    insert_at: str = spec_field("word_embeddings", help="As PromptTuning.insert_at (PEFT: 'word_embeddings').")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("prompt_length", check_int("prompt_length", self.prompt_length, minimum=1))
        check_choice("encoder_type", self.encoder_type, ENCODERS)
        if self.encoder_hidden_size is not None:
            set_("encoder_hidden_size", check_int("encoder_hidden_size", self.encoder_hidden_size, minimum=1))
        set_("encoder_num_layers", check_int("encoder_num_layers", self.encoder_num_layers, minimum=1))
        set_("encoder_dropout", check_real("encoder_dropout", self.encoder_dropout, 0.0, 1.0))
        check_choice("combine", self.combine, COMBINES)
        check_choice("insert_at", self.insert_at, INSERT_AT)

    def includes_layer(self, index: int) -> bool:
        return True


class PTuningModule(PromptTuningModule):
    """Prompt tuning whose prompt is ``encoder(embedding)`` (see module docstring); parameter names follow PEFT's
    ``PromptEncoder`` (``virtual_tokens`` = ``embedding.weight``, ``mlp_head.*``, ``lstm_head.*``)."""

    def __init__(self, length: int, hidden: int, spec: PTuning, *, dtype=None, device=None):
        nn.Module.__init__(self)
        self.length, self.combine, self.active = int(length), spec.combine, True
        h = spec.encoder_hidden_size or hidden
        factory = {"dtype": dtype, "device": device}
        self.virtual_tokens = nn.Parameter(torch.zeros(length, hidden, **factory))
        self.encoder_type = spec.encoder_type
        if spec.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=hidden, hidden_size=h, num_layers=spec.encoder_num_layers,
                                     dropout=spec.encoder_dropout, bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(),
                                          nn.Linear(2 * h, hidden, **factory))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(hidden, h, **factory), nn.ReLU(), nn.Linear(h, h, **factory),
                                          nn.ReLU(), nn.Linear(h, hidden, **factory))

    def prompt(self) -> Tensor:
        e = self.virtual_tokens.unsqueeze(0)
        if self.lstm_head is not None:
            e = self.lstm_head(e)[0]
        return self.mlp_head(e)[0]

    def extra_repr(self) -> str:
        return f"prompt_length={self.length}, encoder={self.encoder_type}, combine={self.combine!r}"


def peft_spec(cfg) -> PromptTuning:
    """A saved PEFT P-tuning adapter holds the encoder's output (``prompt_embeddings``): plain prompt tuning."""
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise CheckpointError(f"PEFT P-tuning with num_transformer_submodules={subs} is not supported by the importer")
    try:
        return PromptTuning(prompt_length=int(cfg["num_virtual_tokens"]), insert_at="word_embeddings")
    except (KeyError, SpecError) as e:
        raise CheckpointError(f"PEFT P-tuning config does not translate: {e}") from e


__all__ = ["ENCODERS", "PTuning", "PTuningModule", "peft_spec"]
