"""VeRA / DVoRA in AdapterHub's form as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), AdapterHub
interop below (the LoRA-family format of :mod:`graphadapt.methods.adapterhub_loras`).

before: ``y = linear(x, W, b)``  →  after: ``y' = VeraHubModule(x, y, W, b)`` (see :mod:`.module`). Mergeable unless gated.
"""

from __future__ import annotations

import re

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.init import adapter_generator
from graphadapt.methods.adapterhub_loras import config_dict, leave_out, load_weights, lora_variant, targets
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.registry import register
from graphadapt.passes import submodule_or_none
from graphadapt.vocab import adapter_prefix, adapter_target

from .module import SharedProjections, VeraHubModule
from .spec import PROJECTION_INITS, VeraHub

SHARED = "shared_vera"
_SHARED_TENSORS = {"lora_A": "proj_A", "lora_B": "proj_B"}   # AdapterHub's shared_parameters names → ours


@register
class VeraHubMethod(LinearSiteMethod):
    name = "vera_hub"
    spec_class = VeraHub
    adapterhub_architectures = ("lora",)

    def prepare(self, gm, adapter, spec: VeraHub, sites, seed):
        bad = [s for s in sites if s.out_slice is not None or getattr(s, "out_rows", None) is not None
               or s.layout != "linear" or getattr(s, "num_experts", None)]
        if bad:
            raise SpecError(f"adapter {adapter!r}: VeRA needs whole nn.Linear-style sites; {bad[0].name} is a fused "
                            f"slice, a transposed (Conv1D) or an expert weight", field="targets")
        shapes = {(s.in_features, s.out_features) for s in sites}
        if len(shapes) != 1:
            raise SpecError(f"adapter {adapter!r}: VeRA shares A and B across its sites, which must then have one shape; "
                            f"got {sorted(shapes)} (as AdapterHub, target sites of equal shape, e.g. q and v without "
                            "grouped-query attention)", field="targets")
        kept = submodule_or_none(gm, adapter_target(adapter, SHARED))
        if kept is None:  # re-planning (set_active) keeps the existing projections
            (fan_in, fan_out), ref = shapes.pop(), next(gm.parameters())
            kept = SharedProjections(spec.r, fan_in, fan_out, spec.projection_init, spec.projection_seed,
                                     adapter_generator(seed, adapter, SHARED), dtype=ref.dtype, device=ref.device)
            gm.add_submodule(adapter_target(adapter, SHARED), kept)
        return {"shared": kept}

    def build(self, spec: VeraHub, adapter, site, seed, weight=None, shared=None):
        mod = VeraHubModule(shared, site.in_features, site.out_features, r=spec.r, alpha=spec.alpha,
                         d_init=spec.d_init, b_init=spec.b_init, dropout=spec.dropout, magnitude=spec.magnitude,
                         use_gating=spec.use_gating, generator=adapter_generator(seed, adapter, site.name),
                         dtype=weight.dtype, device=weight.device)
        if spec.magnitude:
            mod.init_magnitude_(weight.detach())
        return mod

    # -- AdapterHub (LoRAConfig with vera_d / vera_b: "vera", "dvora")
    def adapterhub_spec(self, config):
        cfg = config_dict(config, "add")
        if cfg is None or lora_variant(cfg) != "vera":
            return None
        if cfg["init_weights"] not in PROJECTION_INITS:
            raise CheckpointError(f"AdapterHub VeRA init_weights={cfg['init_weights']!r} is not supported "
                                  f"(supported: {', '.join(PROJECTION_INITS)})")
        try:
            return VeraHub(r=cfg["r"], alpha=cfg["alpha"], d_init=cfg["vera_d"] if cfg["vera_d"] is not None else 0.0,
                        b_init=cfg["vera_b"] if cfg["vera_b"] is not None else 0.0, dropout=float(cfg["dropout"]),
                        targets=targets(cfg), leave_out=leave_out(cfg), magnitude=bool(cfg["use_dora"]),
                        use_gating=bool(cfg["use_gating"]), projection_init=cfg["init_weights"],
                        projection_seed=cfg["init_weights_seed"])
        except SpecError as e:
            raise CheckpointError(f"AdapterHub VeRA config does not translate to a graphadapt VeraHub: {e}") from e

    def load_adapterhub(self, adapted, adapter, saved_name, state_dict, strict, directory):
        shared_re = re.compile(rf"^(?:.*\.)?shared_parameters\.{re.escape(saved_name)}\.(lora_A|lora_B)$")
        shared_sd = {m.group(1): v for k, v in state_dict.items() if (m := shared_re.match(k))}
        rest = {k: v for k, v in state_dict.items() if not shared_re.match(k)}
        load_weights(adapted, adapter, saved_name, rest, strict, directory)
        spec = adapted.spec.adapters[adapter] if adapter in adapted.spec.adapters else None
        shared = adapted.get_submodule(adapter_prefix(adapter) + SHARED)
        if not shared_sd:
            if strict and (spec is None or spec.projection_seed is None):
                raise CheckpointError(
                    f"AdapterHub checkpoint {directory} does not hold VeRA's shared projections A and B (AdapterHub "
                    "saves shared_parameters only under a model with a head) and its config has no init_weights_seed "
                    "to draw them again; pass strict=False to keep graphadapt's own random projections")
            return
        with torch.no_grad():
            for k, v in shared_sd.items():
                buf = getattr(shared, _SHARED_TENSORS[k])
                if buf.shape != v.shape:
                    raise CheckpointError(f"AdapterHub VeRA tensor {k}: checkpoint {tuple(v.shape)} vs model "
                                          f"{tuple(buf.shape)}")
                buf.copy_(v.to(buf.dtype))


__all__ = ["SharedProjections", "VeraHub", "VeraHubMethod", "VeraHubModule"]
