"""Bottleneck adapters as a method plugin: spec and presets (:mod:`.spec`), module (:mod:`.module`),
Compacter PHM layers (:mod:`.phm`), AdapterHub interop (:mod:`.adapterhub`), registry entry below.

before (post-LN): ``out = LN(h + in)``  →  after: ``out = BottleneckAdapter(h, in, LN.w, LN.b)``
before (pre-LN):  ``out = in + h``      →  after: ``out = BottleneckAdapter(h, in, None, None)``
Not mergeable (it depends on the input non-linearly); stays in the graph.
"""

from __future__ import annotations

from dataclasses import fields

from graphadapt.errors import SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.base import ResidualSiteMethod
from graphadapt.methods.registry import register
from graphadapt.passes import submodule_or_none
from graphadapt.vocab import adapter_target

from . import adapterhub as _ah
from .module import BottleneckAdapter, module_kwargs
from .phm import PHMConfig, init_shared_phm_parameters
from .spec import (ACTIVATIONS, BN_INITS, PRESETS, AdapterPlus, Bottleneck, Compacter, CompacterPlusPlus, DoubleSeqBn,
                   ParBn, SeqBn, adapterhub_config_dict)

SHARED = "shared_phm"


@register
class BottleneckMethod(ResidualSiteMethod):
    name = "bottleneck"
    spec_class = Bottleneck
    adapterhub_architectures = (None, "bottleneck")

    def positions(self, spec: Bottleneck) -> tuple[str, ...]:
        return tuple(p for p, on in (("mh", spec.mh_adapter), ("output", spec.output_adapter)) if on)

    def select(self, sm, spec: Bottleneck, adapter):
        targets = super().select(sm, spec, adapter)
        for t in targets:
            hidden = t.hidden_size
            if hidden is None:
                continue
            size = max(1, int(hidden // spec.reduction_for(t.layer.index)))
            if spec.phm_layer and (size % spec.phm_dim or hidden % spec.phm_dim):
                raise SpecError(
                    f"adapter {adapter!r}: PHM layers need hidden size ({hidden}) and bottleneck size "
                    f"({size} = {hidden} // reduction_factor {spec.reduction_for(t.layer.index)}) divisible by "
                    f"phm_dim={spec.phm_dim}; lower reduction_factor or change phm_dim.", field="reduction_factor")
        return targets

    def prepare(self, gm, adapter, spec: Bottleneck, targets, seed):
        if not (spec.phm_layer and (spec.shared_phm_rule or spec.shared_W_phm)):
            return {"shared": None}
        # Compacter shares PHM rules (and optionally W) across every layer of one adapter
        from graphadapt.passes.residual import reference_parameter

        kept = submodule_or_none(gm, adapter_target(adapter, SHARED))
        if kept is not None:  # re-planning (set_active): keep the trained shared parameters
            return {"shared": kept}

        t = targets[0]
        hidden = int(t.hidden_size)
        ref = reference_parameter(gm, t)
        cfg = PHMConfig(**{f.name: getattr(spec, f.name) for f in fields(PHMConfig)})
        size = max(1, int(hidden // spec.reduction_for(t.layer.index)))
        shared = init_shared_phm_parameters(
            hidden, size, cfg, generator=adapter_generator(seed, adapter, SHARED),
            init_weights=spec.init_weights, dtype=ref.dtype, device=ref.device)
        gm.add_submodule(adapter_target(adapter, SHARED), shared)
        return {"shared": shared}

    def build(self, spec: Bottleneck, adapter, t, seed, hidden=None, norm=None, ref=None, shared=None):
        return BottleneckAdapter(
            int(hidden), **module_kwargs(spec, t.layer.index), shared=shared,
            norm_kind=norm.kind if norm is not None else None,
            norm_eps=norm.eps if norm is not None else 1e-12,
            generator=adapter_generator(seed, adapter, t.name), dtype=ref.dtype, device=ref.device)

    def adapterhub_spec(self, config):
        return _ah.spec_from_config(config)

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        _ah.load_weights(adapted, adapter, saved_name, state_dict, strict, directory)

    def load_adapterhub_fusion(self, adapted, fusion_name, saved_name, state_dict, strict, directory):
        _ah.load_fusion_weights(adapted, fusion_name, saved_name, state_dict, strict, directory)


__all__ = ["ACTIVATIONS", "BN_INITS", "PRESETS", "AdapterPlus", "Bottleneck", "BottleneckAdapter", "BottleneckMethod",
           "Compacter", "CompacterPlusPlus", "DoubleSeqBn", "ParBn", "SeqBn", "adapterhub_config_dict"]
