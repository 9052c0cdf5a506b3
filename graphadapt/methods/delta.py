"""Shared base of weight-delta methods at a linear site (not a method): LoHa, LoKr, VeRA, FourierFT, SHiRA, C3A, …

Transform (one site, base op ``y = x Wᵀ + b``)::

    before:  y  = linear(x, W, b)
    after:   y' = module(x, y, W, b) = y + dropout(x) ΔWᵀ        (on the channels the module owns)
    merged:  W' = W + ΔW                                          (unmerge restores W by reference)

A subclass only says what ``ΔW`` is: :meth:`DeltaSiteModule.delta_weight` returns it as ``[out_features, in]``
(nn.Linear layout, this module's rows); it may override :meth:`DeltaSiteModule.delta_output` when a factorised
product is cheaper than forming ``ΔW`` (VeRA). Fused projections (GPT-2's ``c_attn`` slices, interleaved QKV rows)
and the ``[in, out]`` Conv1D layout come from :class:`~graphadapt.methods.sliced.SlicedSiteModule`.

Also here: the helpers every such plugin needs — refusing expert (3-d) sites, a per-method PEFT key pattern, the
PEFT options no weight-delta importer can express, and a reference to an adapter-wide shared module that is not
registered as a submodule of each site (so its tensors are saved once, under ``adapters.<name>.<shared>``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.sliced import SlicedSiteModule
from graphadapt.passes import submodule_or_none
from graphadapt.vocab import adapter_target


class DeltaSiteModule(SlicedSiteModule):
    """``(x, y, W, b) → y + dropout(x) ΔWᵀ``; mergeable (``W + ΔW``). Subclasses implement :meth:`delta_weight`."""

    mergeable = True
    merge_refusal = None
    reads_base_weight = None

    def _init_delta(self, site, dropout: float = 0.0) -> None:
        """Site geometry (slice, rows, Conv1D layout) and the input dropout (``nn.Identity`` when 0)."""
        self._init_site(site.in_features, site.out_features, site.out_slice, site.total_out,
                        site.layout == "conv1d", getattr(site, "out_rows", None))
        self.active = True
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(p for p in self.parameters()).dtype

    def delta_weight(self) -> Tensor:
        """``ΔW`` as ``[out_features, in_features]`` (this module's rows, nn.Linear layout)."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight()")

    def delta_output(self, x: Tensor) -> Tensor:
        """``x ΔWᵀ`` (``x`` already in the adapter dtype, dropout applied)."""
        return F.linear(x, self.delta_weight())

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.active:
            return y
        dt = self.adapter_dtype
        if x.dtype != dt:
            x = x.to(dt)
        return self._replace_slice(y, self._own(y) + self.delta_output(self.dropout(x)).to(y.dtype))

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, *,
             base_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(W, b) → (W + ΔW, b)`` (new tensors, base layout, full fused shape; other rows bit-identical)."""
        new_weight = weight.detach().clone()
        rows = self._rows(new_weight)
        rows.add_(self.delta_weight().detach().to(dtype=weight.dtype, device=weight.device))
        self._commit_rows(new_weight, rows)
        return new_weight, None if bias is None else bias.detach().clone()

    def _site_repr(self) -> list[str]:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        if self.out_slice is not None:
            parts.append(f"out_slice={self.out_slice}, total_out={self.total_out}")
        if self.out_rows is not None:
            parts.append(f"out_rows=<{len(self.out_rows)} interleaved>, total_out={self.total_out}")
        return parts


def refuse_expert_site(method: str, adapter: str, site) -> None:
    """Weight-delta methods act on 2-d weights; an expert site (3-d fused expert weights) is a clear SpecError."""
    if getattr(site, "num_experts", None):
        raise SpecError(f"adapter {adapter!r}: {method} is not available on the expert weights of {site.name}; "
                        "target attention/dense roles or module paths instead", field="targets")


def prepare_shared(gm, adapter: str, shared: str, sites, method: str, make) -> nn.Module:
    """The adapter-wide module at ``adapters.<adapter>.<shared>`` (``Method.prepare`` of a method with shared tensors).

    Re-planning (``set_active``) keeps the module already there, trained tensors included. Otherwise expert sites
    are refused, ``make(ref_weight)`` builds and initialises the module (``ref_weight``: the first site's base weight,
    for dtype/device) and it is registered once."""
    kept = submodule_or_none(gm, adapter_target(adapter, shared))
    if kept is not None:
        return kept
    for s in sites:
        refuse_expert_site(method, adapter, s)
    module = make(gm.get_parameter(sites[0].weight))
    gm.add_submodule(adapter_target(adapter, shared), module)
    return module


class SharedRef:
    """Holds an adapter-wide module (random projections, a vector bank) without registering it under each site.

    The module itself lives once at ``adapters.<name>.<shared>`` (so its tensors are saved and imported once);
    each site module reads it through ``ref.module``. Deep copies keep the sharing (one memo per copy)."""

    def __init__(self, module: nn.Module):
        self.module = module


def peft_key_pattern(kinds: tuple[str, ...], shared: tuple[str, ...] = ()) -> re.Pattern:
    """Regex for ``[base_model.model.]<path>.<kind>[.<adapter>][.weight]`` keys, and for adapter-wide
    ``base_model.<shared>`` keys (group ``path`` is then empty)."""
    alt = "|".join(map(re.escape, kinds))
    per_site = rf"(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>{alt})(?:\.(?P<adapter>[A-Za-z_]\w*))?(?:\.weight)?"
    if not shared:
        return re.compile(rf"^{per_site}$")
    sh = "|".join(map(re.escape, shared))
    return re.compile(rf"^(?:base_model\.(?P<shared>{sh})(?:\.(?P<sadapter>[A-Za-z_]\w*))?|{per_site})$")


def refuse_peft_options(cfg: Mapping[str, Any], names: tuple[str, ...], what: str) -> None:
    """A PEFT option that changes what the adapter computes and that the importer does not express: a
    CheckpointError naming it, instead of importing an adapter with other numbers."""
    bad = {k: cfg.get(k) for k in names if cfg.get(k)}
    if cfg.get("bias", "none") not in ("none", None):
        bad["bias"] = cfg["bias"]
    if bad:
        raise CheckpointError(f"PEFT {what} options not supported by the importer: {bad}; re-train without them "
                              "or merge the adapter with PEFT (merge_and_unload) instead.")


def per_module_peft_export(what: str, fields: Mapping[str, Any], modules: Mapping[str, nn.Module], records: list,
                           rename: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """``Method.peft_export`` for a method whose PEFT tensors are its modules' parameters under the same names
    (``<path>.<name>``; ``rename`` maps a name to PEFT's suffix): PEFT config fields and tensors. Sites PEFT cannot
    hold (Conv1D, a part of a fused projection, expert weights) are a CheckpointError."""
    from graphadapt.methods.sliced import peft_inexpressible_sites

    refused = peft_inexpressible_sites(modules, records)
    if refused:
        raise CheckpointError(f"PEFT's {what} cannot express {refused} (sites that are not whole nn.Linear "
                              "layers); save with save_adapters instead")
    tensors = {f"{path}.{(rename or {}).get(n, n)}": p for path, m in modules.items()
               for n, p in m.named_parameters()}
    return {**fields, "target_modules": sorted(modules)}, tensors


def resolve_module_path(ckpt_path: str, module_names: set[str]) -> str | None:
    """The module of the model a checkpoint path names, allowing a wrapper prefix on either side (as the generic
    PEFT reader does), for plugins with their own ``peft_read``."""
    if ckpt_path in module_names:
        return ckpt_path
    parts = ckpt_path.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in module_names:
            return ".".join(parts[i:])
    hits = [m for m in module_names if m.endswith("." + ckpt_path)]
    return hits[0] if len(hits) == 1 else None


def config_number(cfg: Mapping[str, Any], key: str, kind=float, default: Any = None) -> Any:
    """``cfg[key]`` as ``kind`` (a CheckpointError naming the key when missing or not a number)."""
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"adapter_config.json lacks {key!r}; is it the PEFT config this importer expects?")
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter_config.json: {key} must be a number, got {value!r}") from e


__all__ = ["DeltaSiteModule", "SharedRef", "config_number", "peft_key_pattern", "per_module_peft_export",
           "prepare_shared", "refuse_expert_site",
           "refuse_peft_options", "resolve_module_path"]
