"""Prompt tuning as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), interop (:mod:`.interop`).

Site kind ``embedding`` (:mod:`graphadapt.sites.embedding`): the prompt is added at the input embeddings and
the inputs grow by ``prompt_length`` tokens (mask extended with ones), so the output sequence is
``prompt_length`` longer. Not mergeable.

Init (seeded: ``adapter_generator(seed, adapter, "embeddings")`` only): ``random_uniform`` draws
U(±random_uniform_scale); ``from_string`` copies the word-embedding rows of ``prompt_init_ids``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator, kaiming_uniform_, normal_, uniform_
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.sites.embedding import getattr_path
from graphadapt.vocab import SiteKind

from . import interop as _io
from .module import PromptTuningModule
from .ptuning import PTuning, PTuningModule
from .ptuning import peft_spec as _ptuning_peft_spec
from .spec import COMBINES, INSERT_AT, PROMPT_INITS, PromptTuning


@register
class PromptTuningMethod(Method):
    name = "prompt_tuning"
    spec_class = PromptTuning
    site_kind = SiteKind.EMBEDDING   # exclusive: two prompts at one input are not defined (AdapterHub uses the first active one)
    peft_type = "PROMPT_TUNING"
    adapterhub_architectures = ("prompt_tuning",)

    def prepare(self, gm, adapter, spec, sites, seed):
        return {"weight": getattr_path(gm, sites[0].weight)}

    def build(self, spec: PromptTuning, adapter, site, seed, weight=None):
        width = site.width(spec.insert_at)
        mod = PromptTuningModule(spec.prompt_length, width, spec.combine, dtype=weight.dtype,
                                 device=weight.device)
        # positions the model's position embedding must cover beyond the input's (graphadapt.contract)
        mod.added_positions = spec.prompt_length if spec.insert_at == "word_embeddings" else 0
        with torch.no_grad():
            if spec.prompt_init == "from_string":
                if width != weight.shape[1]:
                    raise SpecError(f"prompt_init='from_string' copies word embeddings ({weight.shape[1]} wide), but "
                                    f"the embedding output is {width} wide (a projected embedding, as ALBERT's); use "
                                    "insert_at='word_embeddings' or prompt_init='random_uniform'",
                                    field="prompt_init")
                ids = spec.init_ids()
                if max(ids) >= weight.shape[0]:
                    raise SpecError(f"prompt_init_ids has id {max(ids)}, but the vocabulary has {weight.shape[0]} "
                                    "tokens", field="prompt_init_ids")
                mod.prompt_embeddings.copy_(weight.detach()[torch.tensor(ids, device=weight.device)])
            else:
                s = spec.random_uniform_scale
                uniform_(mod.prompt_embeddings, -s, s, adapter_generator(seed, adapter, site.name))
        return mod

    # -- interop
    def peft_spec(self, config, targets):
        return _io.peft_spec(config)

    def peft_key(self, key):
        return _io.peft_key(key)

    def adapterhub_spec(self, config):
        return _io.adapterhub_spec(config)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _io.load_adapterhub(adapted, adapter, saved_name, state_dict, strict, directory)


@register
class PTuningMethod(PromptTuningMethod):
    """P-tuning: prompt tuning whose prompt an encoder computes (:mod:`.ptuning`). Init: PEFT's module defaults
    (embedding N(0, 1), ``nn.Linear``/``nn.LSTM`` defaults) drawn from the site's generator only."""

    name = "p_tuning"
    spec_class = PTuning
    peft_type = "P_TUNING"
    adapterhub_architectures = ()

    def build(self, spec: PTuning, adapter, site, seed, weight=None):
        width = site.width(spec.insert_at)
        mod = PTuningModule(spec.prompt_length, width, spec, dtype=weight.dtype, device=weight.device)
        mod.added_positions = spec.prompt_length if spec.insert_at == "word_embeddings" else 0
        g = adapter_generator(seed, adapter, site.name)
        with torch.no_grad():
            normal_(mod.virtual_tokens, 1.0, g)
            for layer in mod.mlp_head:
                if isinstance(layer, nn.Linear):   # nn.Linear's own init
                    kaiming_uniform_(layer.weight, math.sqrt(5), g)
                    bound = 1.0 / math.sqrt(layer.in_features)
                    uniform_(layer.bias, -bound, bound, g)
            if mod.lstm_head is not None:          # nn.LSTM's: U(±1/sqrt(h)) for every tensor
                bound = 1.0 / math.sqrt(mod.lstm_head.hidden_size)
                for p in mod.lstm_head.parameters():
                    uniform_(p, -bound, bound, g)
        return mod

    def peft_spec(self, config, targets):
        return _ptuning_peft_spec(config)

    def adapterhub_spec(self, config):
        return None


__all__ = ["COMBINES", "INSERT_AT", "PROMPT_INITS", "PTuning", "PTuningMethod", "PTuningModule", "PromptTuning",
           "PromptTuningMethod", "PromptTuningModule"]
