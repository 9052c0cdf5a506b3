"""Prediction heads saved by AdapterHub ``save_adapter(dir, name, with_head=True)``.

before: ``head_config.json`` + ``pytorch_model_head.bin`` / ``model_head.safetensors`` beside the adapter
after:  a flexible head (``config`` is a head config): the base model wrapped in
        :class:`graphadapt.heads.ModelWithHead` with the saved tensors; a static head (a transformers
        ``…ForSequenceClassification`` with ``adapters.init``; ``config`` is null): the saved modules
        (``classifier.*``) named for ``Spec.modules_to_save`` and filled from the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..heads import ModelWithHead
from .files import read_json, read_tensors

HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHT_FILES = ("model_head.safetensors", "pytorch_model_head.bin")

__all__ = ["AdapterHubHead", "read_adapterhub_head"]


class AdapterHubHead:
    """A saved head: ``attach(model, name)`` → the model to capture and the ``modules_to_save`` that train it;
    ``fill(adapted, strict)`` copies the saved tensors in."""

    def __init__(self, directory, config: Mapping | None, saved: str | None, tensors: dict[str, torch.Tensor]):
        self.directory, self.config, self.saved, self.tensors = directory, config, saved, tensors
        self.name: str | None = None
        self.modules: tuple[str, ...] = ()
        self.tied: set[str] = set()

    @property
    def flexible(self) -> bool:
        return self.config is not None

    def fits(self, model: nn.Module) -> bool:
        """Whether ``model`` can take the head: a flexible head always (it wraps the model), a static head when
        ``model`` has every saved tensor as a parameter."""
        if self.flexible:
            return True
        have = dict(model.named_parameters(remove_duplicate=False))
        return all(k in have for k in self.tensors)

    def attach(self, model: nn.Module, name: str) -> tuple[nn.Module, tuple[str, ...]]:
        """The model to capture (a flexible head wraps ``model`` as a :class:`ModelWithHead`, or joins the heads of
        one: several adapters' heads import into one model, as AdapterHub's flexible-head models hold them) and the
        ``modules_to_save`` that train the head."""
        if self.flexible:
            self.name = name
            if isinstance(model, ModelWithHead):  # a second adapter's head joins the heads already there
                model.add_head(name, self.config, seed=None)
                wrapped = model
            else:
                wrapped = ModelWithHead(model, name, self.config, seed=None)
            self.modules = (f"heads.{name}",)
            self.tied = {k for k in dict(wrapped.named_parameters(remove_duplicate=False))
                         if k.startswith(f"heads.{name}.") and _tied(wrapped, k)}
            return wrapped, self.modules
        have = dict(model.named_parameters(remove_duplicate=False))
        missing = [k for k in self.tensors if k not in have]
        if missing:
            raise CheckpointError(f"{self.directory}: the saved head's tensors {missing[:4]} are no parameters of "
                                  f"{type(model).__name__}; load the model class the head was saved from "
                                  f"(e.g. the same …ForSequenceClassification), or pass with_head=False")
        self.modules = tuple(sorted({k.rsplit(".", 1)[0] for k in self.tensors}))
        return model, self.modules

    def _ours(self, key: str) -> str:
        if not self.flexible:
            return key
        prefix = f"heads.{self.saved}."
        if not key.startswith(prefix):
            raise CheckpointError(f"{self.directory}: head tensor {key!r} is not under {prefix!r}")
        return f"heads.{self.name}." + key[len(prefix):]

    @torch.no_grad()
    def fill(self, adapted: nn.Module, strict: bool = True) -> None:
        params = dict(adapted.named_parameters(remove_duplicate=False))
        done = set()
        for key, t in self.tensors.items():
            ours = self._ours(key)
            p = params.get(ours)
            if p is None:
                raise CheckpointError(f"{self.directory}: head tensor {key!r} has no place in the adapted model "
                                      f"(looked for {ours!r})")
            if tuple(p.shape) != tuple(t.shape):
                raise CheckpointError(f"{self.directory}: head tensor {key!r} is {tuple(t.shape)}, the model's "
                                      f"{ours!r} is {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
            done.add(ours)
        if strict and self.flexible:
            # a vocabulary projection tied to the input embeddings may be left out: it keeps the embeddings' values
            left = [k for k in params if k.startswith(f"heads.{self.name}.") and k not in done and k not in self.tied]
            if left:
                raise CheckpointError(f"{self.directory}: the head checkpoint does not hold {left}")


def _tied(model: nn.Module, key: str) -> bool:
    emb = getattr(model, "get_input_embeddings", None)
    return False if emb is None else key.endswith(".weight") and model.get_parameter(key) is emb().weight


def read_adapterhub_head(directory: str | os.PathLike) -> AdapterHubHead | None:
    """The head saved beside an AdapterHub adapter (``with_head=True``), or None when there is none."""
    d = Path(directory)
    if not (d / HEAD_CONFIG_FILE).exists():
        return None
    meta = read_json(d / HEAD_CONFIG_FILE)
    for fname in HEAD_WEIGHT_FILES:
        if (d / fname).exists():
            sd = read_tensors(d / fname, allow_pickle=True)  # AdapterHub's default .bin: weights_only=True
            break
    else:
        raise CheckpointError(f"{directory} has {HEAD_CONFIG_FILE} but no head weights "
                              f"(looked for {', '.join(HEAD_WEIGHT_FILES)})")
    cfg = meta.get("config")
    if cfg is not None and not isinstance(cfg, Mapping):
        raise CheckpointError(f"{d / HEAD_CONFIG_FILE}: 'config' must be a head config or null, got {cfg!r}")
    saved = meta.get("name")
    if cfg is not None and not isinstance(saved, str):
        raise CheckpointError(f"{d / HEAD_CONFIG_FILE} names no head")
    return AdapterHubHead(directory, dict(cfg) if cfg is not None else None, saved, sd)
