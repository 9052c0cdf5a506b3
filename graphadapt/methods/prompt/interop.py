"""Prompt tuning checkpoints from PEFT (``PROMPT_TUNING``) and AdapterHub (``prompt_tuning``).

PEFT: ``adapter_model.safetensors`` holds ``prompt_embeddings`` [num_virtual_tokens, hidden]; PEFT concatenates
them in front of the *word* embeddings and extends the mask with ones (→ ``insert_at="word_embeddings"``).
AdapterHub: ``[<prefix>.]prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight`` [prompt_length, hidden],
added after the embedding block (→ ``insert_at="embedding_output"``).
Ours: ``adapters.<name>.embeddings.prompt_embeddings``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.sites.embedding import SITE
from graphadapt.vocab import adapter_prefix

from .spec import PromptTuning

TENSOR = f"{SITE}.prompt_embeddings"

_AH_KNOWN = {"architecture", "prompt_length", "prompt_init", "prompt_init_text", "combine", "init_weights_seed",
             "random_uniform_scale"}


def peft_key(key: str) -> tuple[str, str] | None:
    """PEFT's one tensor is not at a module path: ``("", our tensor name)``."""
    return ("", TENSOR) if re.fullmatch(r"(?:base_model\.model\.)?prompt_embeddings", key) else None


def peft_spec(cfg: Mapping) -> PromptTuning:
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise CheckpointError(f"PEFT prompt tuning with num_transformer_submodules={subs} (an encoder-decoder prompt "
                              "for both stacks) is not supported by the importer; only one prompt is")
    try:
        return PromptTuning(prompt_length=int(cfg["num_virtual_tokens"]), insert_at="word_embeddings")
    except (KeyError, SpecError) as e:
        raise CheckpointError(f"PEFT prompt tuning config does not translate: {e}") from e


def adapterhub_spec(config: Mapping | str) -> PromptTuning | None:
    """AdapterHub ``PromptTuningConfig`` (dict or ``"prompt_tuning"``) → :class:`PromptTuning`, None if not ours.

    ``prompt_init="from_string"`` has text, not token ids; it translates to ``random_uniform`` with the text
    kept (the init only matters before training; an import loads the trained prompt).
    """
    if isinstance(config, str):
        return PromptTuning() if config.lower() == "prompt_tuning" else None
    if isinstance(config.get("config"), (Mapping, str)):
        return adapterhub_spec(config["config"])
    if config.get("architecture") != "prompt_tuning":
        return None
    unknown = sorted(set(config) - _AH_KNOWN)
    if unknown:
        raise CheckpointError(f"AdapterHub prompt tuning config has options graphadapt does not know: {unknown}")
    try:
        return PromptTuning(prompt_length=config.get("prompt_length", 10), combine=config.get("combine", "prefix"),
                            prompt_init_text=config.get("prompt_init_text"),
                            random_uniform_scale=config.get("random_uniform_scale", 0.5),
                            insert_at="embedding_output")
    except SpecError as e:
        raise CheckpointError(f"AdapterHub prompt tuning config does not translate: {e}") from e


def load_adapterhub(adapted, ours: str, saved: str, sd: Mapping[str, torch.Tensor], strict: bool, directory) -> None:
    pat = re.compile(rf"(?:^|\.)prompt_tunings\.{re.escape(saved)}\.prompt_embedding\.weight$")
    hits = [k for k in sd if pat.search(k)]
    unused = [k for k in sd if k not in hits]
    name = adapter_prefix(ours) + TENSOR
    params = dict(adapted.named_parameters())
    if len(hits) != 1 or name not in params:
        raise CheckpointError(f"AdapterHub checkpoint {directory} has {len(hits)} prompt tensors for {saved!r} "
                              f"(expected 1) or the model has no {name}")
    p, v = params[name], sd[hits[0]]
    if p.shape != v.shape:
        raise CheckpointError(f"AdapterHub prompt {hits[0]} {tuple(v.shape)} does not fit {name} {tuple(p.shape)}")
    if strict and unused:
        raise CheckpointError(f"AdapterHub checkpoint {directory}: {len(unused)} tensors unused, e.g. {unused[:3]}")
    with torch.no_grad():
        p.copy_(v.to(p.dtype))


__all__ = ["adapterhub_spec", "load_adapterhub", "peft_key", "peft_spec"]
