"""Prompt tuning spec (Lester et al., 2021): ``prompt_length`` learned token embeddings added to the input.

The adapted model's output sequence is ``prompt_length`` longer than its input (AdapterHub and PEFT do the
same): with ``combine="prefix"`` the first ``prompt_length`` positions are the prompt's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from graphadapt.errors import SpecError
from graphadapt.spec.base import MethodSpec, check_choice, check_int, check_real, is_int, register_method, spec_field

PROMPT_INITS = ("random_uniform", "from_string")
COMBINES = ("prefix", "prefix_after_bos")
INSERT_AT = ("embedding_output", "word_embeddings")


@register_method
@dataclass(frozen=True)
class PromptTuning(MethodSpec):
    """Soft prompt tokens at the input embeddings (AdapterHub ``PromptTuningConfig`` / PEFT ``PROMPT_TUNING``)."""

    method: ClassVar[str] = "prompt_tuning"

    prompt_length: int = spec_field(10, help="Number of soft prompt tokens (int > 0); the output grows by as many.")
    prompt_init: str = spec_field(
        "random_uniform",
        help="'random_uniform': U(-random_uniform_scale, +random_uniform_scale); 'from_string': the word embeddings "
        "of prompt_init_ids, repeated to prompt_length and cut (AdapterHub's rule).")
    prompt_init_ids: tuple[int, ...] | None = spec_field(
        None, help="Token ids for prompt_init='from_string' (graphadapt has no tokenizer: pass "
        "tokenizer(prompt_init_text)['input_ids']).")
    prompt_init_text: str | None = spec_field(
        None, help="The text prompt_init_ids came from (kept for AdapterHub round trips; not tokenised here).")
    random_uniform_scale: float = spec_field(0.5, help="Bound of the 'random_uniform' init (AdapterHub: 0.5).")
    combine: str = spec_field(
        "prefix", help="'prefix': [prompt; input]; 'prefix_after_bos': [input[0]; prompt; input[1:]] (the mask "
        "is extended at the front either way, as AdapterHub does).")
    insert_at: str = spec_field(
        "embedding_output",
        help="'embedding_output' (AdapterHub): after the model's embedding block, so input tokens keep positions "
        "0..T-1 and the prompt gets no position/token-type embedding or embedding norm; 'word_embeddings' (PEFT): "
        "the prompt joins the word embeddings, so positions count it and the embedding block applies to it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("prompt_length", check_int("prompt_length", self.prompt_length, minimum=1))
        check_choice("prompt_init", self.prompt_init, PROMPT_INITS)
        check_choice("combine", self.combine, COMBINES)
        check_choice("insert_at", self.insert_at, INSERT_AT)
        set_("random_uniform_scale", check_real("random_uniform_scale", self.random_uniform_scale, 0.0, None,
                                                low_open=True))
        if self.prompt_init_text is not None and not isinstance(self.prompt_init_text, str):
            raise SpecError(f"prompt_init_text must be a string or None, got {self.prompt_init_text!r}",
                            field="prompt_init_text")
        ids = self.prompt_init_ids
        if ids is not None:
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                raise SpecError(f"prompt_init_ids must be a list of token ids, got {ids!r}", field="prompt_init_ids")
            ids = tuple(ids)
            if not ids or not all(is_int(i) and i >= 0 for i in ids):
                raise SpecError(f"prompt_init_ids must be a non-empty list of ints >= 0, got {list(ids)!r}",
                                field="prompt_init_ids")
            set_("prompt_init_ids", tuple(int(i) for i in ids))
        if self.prompt_init != "from_string" and self.prompt_init_ids is not None:
            raise SpecError(f"prompt_init_ids are used only with prompt_init='from_string', but prompt_init is "
                            f"{self.prompt_init!r} (the ids would be ignored); pass prompt_init='from_string' to "
                            "start from their embeddings, or drop prompt_init_ids", field="prompt_init_ids")
        if self.prompt_init == "from_string" and self.prompt_init_ids is None:
            raise SpecError(
                "prompt_init='from_string' needs prompt_init_ids: graphadapt does not download tokenizers, so pass "
                "the token ids of the text (tokenizer(text)['input_ids'])", field="prompt_init_ids")

    def includes_layer(self, index: int) -> bool:
        return True

    def init_ids(self) -> tuple[int, ...]:
        """``prompt_init_ids`` repeated to ``prompt_length`` and cut (AdapterHub's rule for 'from_string')."""
        ids = self.prompt_init_ids or ()
        reps = -(-self.prompt_length // len(ids))
        return (ids * reps)[: self.prompt_length]


__all__ = ["COMBINES", "INSERT_AT", "PROMPT_INITS", "PromptTuning"]
