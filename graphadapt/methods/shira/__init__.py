"""SHiRA as a method plugin: spec (:mod:`.spec`), module (:mod:`.module`), PEFT import, registry entry.

before: ``y = linear(x, W, b)``  →  after: ``y' = y + x ΔWᵀ``, ``ΔW`` sparse at fixed positions. Mergeable.
Init: positions from ``adapter_generator(seed, adapter, site)`` (or PEFT's ``random_mask`` with ``random_seed``),
values zero (``init_weights=False``: N(0, 1) from the same generator).

The positions are a buffer, so PEFT checkpoints are read by :meth:`SHiRAMethod.peft_read` (weights and positions).
"""

from __future__ import annotations

import torch

from graphadapt.errors import CheckpointError
from graphadapt.init import adapter_generator, normal_
from graphadapt.methods.base import LinearSiteMethod
from graphadapt.methods.delta import (config_number, peft_key_pattern, per_module_peft_export, refuse_expert_site,
                                      refuse_peft_options, resolve_module_path)
from graphadapt.methods.registry import register
from graphadapt.vocab import adapter_prefix

from .module import SHiRAModule, random_positions
from .spec import SHiRA

_KEY = peft_key_pattern(("shira_weight", "shira_indices"))


@register
class SHiRAMethod(LinearSiteMethod):
    name = "shira"
    spec_class = SHiRA
    peft_type = "SHIRA"

    def build(self, spec: SHiRA, adapter, site, seed, weight=None):
        refuse_expert_site("SHiRA", adapter, site)
        mod = SHiRAModule(site, r=spec.r, dtype=weight.dtype, device=weight.device)
        g = adapter_generator(seed, adapter, site.name)
        where = torch.Generator().manual_seed(spec.random_seed) if spec.random_seed is not None else g
        with torch.no_grad():
            mod.shira_indices.copy_(random_positions(mod.out_features, mod.in_features, mod.shira_weight.numel(),
                                                     where))
            if not spec.init_weights:
                normal_(mod.shira_weight, 1.0, g)
        return mod

    def peft_spec(self, config, targets):
        refuse_peft_options(config, (), "SHiRA")
        return SHiRA(r=config_number(config, "r", int), targets=targets)

    def peft_export(self, spec: SHiRA, modules, records):
        """Values and positions per site (PEFT reads ``<path>.shira_indices`` back into its index dict)."""
        fields, tensors = per_module_peft_export("SHiRA", {
            "peft_type": "SHIRA", "r": spec.r, "mask_type": "random",
            "random_seed": spec.random_seed, "fan_in_fan_out": False, "init_weights": True}, modules, records)
        tensors.update({f"{path}.shira_indices": m.shira_indices for path, m in modules.items()})
        return fields, tensors

    def peft_key(self, key):
        m = _KEY.match(key)
        return None if m is None else (m["path"], m["kind"])

    def peft_read(self, model, config, weights, name, directory):
        """Weights and positions (a buffer, which the generic reader does not fill)."""
        modules = {n for n, _ in model.named_modules() if n}
        mapped = {}
        for key in weights:
            hit = self.peft_key(key)
            if hit is None:
                raise CheckpointError(f"unexpected key {key!r} in the PEFT SHiRA checkpoint {directory} "
                                      "(modules_to_save are not imported with SHiRA)")
            path = resolve_module_path(hit[0], modules)
            if path is None:
                raise CheckpointError(f"the checkpoint adapts {hit[0]!r}, which does not exist in "
                                      f"{type(model).__name__}; was it trained on another architecture?")
            mapped[key] = f"{adapter_prefix(name)}{path}.{hit[1]}"
        if not mapped:
            raise CheckpointError(f"no SHIRA tensors in {directory}")
        spec = self.peft_spec(config, tuple(sorted({k.rsplit(".", 1)[0][len(adapter_prefix(name)):]
                                                    for k in mapped.values()})))

        def fill(adapted) -> None:
            own = adapted.state_dict()
            need = {k for k in own if k.startswith(adapter_prefix(name))}
            if need != set(mapped.values()):
                raise CheckpointError(f"the checkpoint's SHiRA tensors do not match the adapted model: missing "
                                      f"{sorted(need - set(mapped.values()))[:3]}, unexpected "
                                      f"{sorted(set(mapped.values()) - need)[:3]}")
            with torch.no_grad():
                for key, ours in mapped.items():
                    v = weights[key]
                    if tuple(v.shape) != tuple(own[ours].shape):
                        raise CheckpointError(f"{key} has shape {tuple(v.shape)}, {ours} needs "
                                              f"{tuple(own[ours].shape)} (another r?)")
                    own[ours].copy_(v.to(own[ours].dtype))

        return spec, fill


__all__ = ["SHiRA", "SHiRAMethod", "SHiRAModule", "random_positions"]
