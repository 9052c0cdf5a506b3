"""Invertible adapters (MAD-X's NICE coupling block on the embedding output) as a method plugin: spec
(:mod:`.spec`), module (:mod:`.module`), AdapterHub key reading below. Site kind ``hidden``, point
``embedding_output``.

before: ``s = embeddings(ids)`` → first layer  →  after: ``s' = NiceCoupling(s)`` → first layer.
AdapterHub's built-in BERT/GPT-2/Llama models apply only this forward direction (the inverse runs in AdapterHub's
own language-modelling flex heads); so does graphadapt. Not mergeable.
"""

from __future__ import annotations

import re

import torch

from graphadapt.errors import CheckpointError
from graphadapt.init import adapter_generator
from graphadapt.methods.base import Method
from graphadapt.methods.registry import register
from graphadapt.vocab import SiteKind, adapter_prefix

from .module import NiceCoupling
from .spec import BLOCKS, InvertibleAdapter

_KEY = re.compile(r"^(?:.*\.)?invertible_adapters\.([^.]+)\.(.+)$")


@register
class InvertibleMethod(Method):
    name = "invertible"
    spec_class = InvertibleAdapter
    site_kind = SiteKind.HIDDEN

    def points(self, spec):
        return ("embedding_output",)

    def prepare(self, gm, adapter, spec, sites, seed):
        ref = next(gm.parameters())
        return {"dtype": ref.dtype, "device": ref.device}

    def build(self, spec: InvertibleAdapter, adapter, site, seed, dtype=None, device=None):
        return NiceCoupling(site.hidden, spec.reduction_factor, spec.non_linearity,
                            adapter_generator(seed, adapter, site.name), dtype=dtype, device=device)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        """AdapterHub keys ``[<base>.]invertible_adapters.<name>.{F,G}.{0,2}.{weight,bias}``."""
        recs = [r for r in adapted.adapter_records if r.adapter == adapter]
        params = dict(adapted.named_parameters())
        filled, unexpected = set(), []
        with torch.no_grad():
            for k, v in state_dict.items():
                m = _KEY.match(k)
                ours = f"{recs[0].target}.{m.group(2)}" if m and recs and m.group(1) == saved_name else None
                if ours not in params:
                    unexpected.append(k)
                    continue
                if params[ours].shape != v.shape:
                    raise CheckpointError(f"AdapterHub tensor {k}: checkpoint {tuple(v.shape)} vs model "
                                          f"{tuple(params[ours].shape)}")
                params[ours].copy_(v.to(params[ours].dtype))
                filled.add(ours)
        missing = sorted(n for n in params if n.startswith(adapter_prefix(adapter)) and n not in filled)
        if strict and (missing or unexpected):
            raise CheckpointError(f"AdapterHub checkpoint {directory}: invertible adapter {adapter!r} has {len(missing)} "
                                  f"tensors not filled (e.g. {missing[:3]}), {len(unexpected)} unused "
                                  f"(e.g. {unexpected[:3]})")


__all__ = ["BLOCKS", "InvertibleAdapter", "InvertibleMethod", "NiceCoupling"]
