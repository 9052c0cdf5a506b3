"""MTL-LoRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), AdapterHub interop below (the
LoRA-family key format of :mod:`graphadapt.methods.adapterhub_loras`; config ``architecture="mtl_lora"``).

before: ``y = linear(x, W, b)``  →  after: ``y' = MTLLoRAModule(x, y, W, b)``. One adapter is one task; several tasks
run in one batch under AdapterHub's ``MultiTask`` block (rows routed by ``task_ids``:
:mod:`graphadapt.composition.multitask`), gathered per row through the module's ``routed_form``.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.adapterhub_loras import LORA_DEFAULTS, leave_out, load_weights, targets
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register

from .module import MTLLoRAModule
from .spec import MTL_INITS, MTLLoRA

_MTL_DEFAULTS = {**LORA_DEFAULTS, "architecture": "mtl_lora", "n_up_projection": 1,
                 "task_specific_matrix_type": "singular_values", "weights_sharpness": 0.05}


@register
class MTLLoRAMethod(LinearSiteMethod):
    name = "mtl_lora"
    spec_class = MTLLoRA
    adapterhub_architectures = ("mtl_lora",)

    def prepare(self, gm, adapter, spec, sites, seed):
        bad = [s for s in sites if s.out_slice is not None or getattr(s, "out_rows", None) is not None
               or s.layout != "linear" or getattr(s, "num_experts", None)]
        if bad:
            raise SpecError(f"adapter {adapter!r}: MTL-LoRA needs whole nn.Linear-style sites; {bad[0].name} is a "
                            "fused slice, a transposed (Conv1D) or an expert weight", field="targets")
        return {}

    def build(self, spec: MTLLoRA, adapter, site, seed, weight=None):
        return MTLLoRAModule(site.in_features, site.out_features, r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                             n_up=spec.n_up_projection, sharpness=spec.weights_sharpness, init=spec.init,
                             use_gating=spec.use_gating, generator=adapter_generator(seed, adapter, site.name),
                             dtype=weight.dtype, device=weight.device)

    def adapterhub_spec(self, config):
        if isinstance(config, str):
            if config.lower() != "mtl_lora":
                return None
            config = dict(_MTL_DEFAULTS)
        if not isinstance(config, Mapping) or config.get("architecture") != "mtl_lora":
            return None
        cfg = {**_MTL_DEFAULTS, **config}
        unknown = sorted(set(config) - set(_MTL_DEFAULTS))
        if unknown:
            raise CheckpointError(f"AdapterHub MTL-LoRA config has options graphadapt does not know: {unknown}")
        if cfg["task_specific_matrix_type"] != "singular_values":
            raise CheckpointError("AdapterHub MTL-LoRA task_specific_matrix_type='linear' is not importable "
                                  "(AdapterHub 1.3's TaskSpecificLinear cannot be built: it skips nn.Module.__init__)")
        if cfg["composition_mode"] != "add" or cfg["use_dora"] or cfg["vera_d"] is not None or cfg["vera_b"] is not None:
            raise CheckpointError("AdapterHub MTL-LoRA with composition_mode/use_dora/vera options is not supported")
        if cfg["init_weights"] not in MTL_INITS:
            raise CheckpointError(f"AdapterHub MTL-LoRA init_weights={cfg['init_weights']!r} is not supported "
                                  f"(supported: {', '.join(MTL_INITS)})")
        try:
            return MTLLoRA(r=cfg["r"], alpha=cfg["alpha"], dropout=float(cfg["dropout"]), targets=targets(cfg),
                           leave_out=leave_out(cfg), n_up_projection=cfg["n_up_projection"],
                           weights_sharpness=cfg["weights_sharpness"], init=cfg["init_weights"],
                           use_gating=bool(cfg["use_gating"]))
        except SpecError as e:
            raise CheckpointError(f"AdapterHub MTL-LoRA config does not translate: {e}") from e

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        load_weights(adapted, adapter, saved_name, state_dict, strict, directory)


__all__ = ["MTLLoRA", "MTLLoRAMethod", "MTLLoRAModule"]
