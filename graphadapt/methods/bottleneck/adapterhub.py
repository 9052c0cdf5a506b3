"""AdapterHub bottleneck checkpoints ↔ graphadapt: config translation and per-site weight loading.

AdapterHub writes ``adapter_config.json`` (``{"config": {...BnConfig...}, "name": ..., "model_class": ...}``) and
``pytorch_adapter.bin`` (or ``adapter.safetensors``). Per-site keys look like::

    BERT   [bert.]encoder.layer.{i}.attention.output.adapters.<name>.*   (mh)
           [bert.]encoder.layer.{i}.output.adapters.<name>.*             (output)
    GPT-2  [transformer.]h.{i}.attention_adapters.adapters.<name>.*      (mh)
           [transformer.]h.{i}.output_adapters.adapters.<name>.*         (output)
    T5     {encoder,decoder}.block.{j}.layer.0.adapters.<name>.*         (mh; layer.{1|2}: output)
    shared [<base>.]shared_parameters.<name>.<key>                       (Compacter PHM)

Each site is matched to graphadapt's record whose layer module path it contains (so a checkpoint saved from
``BertForSequenceClassification`` loads into ``BertModel`` and vice versa) and to the record's role.

Note: AdapterHub 1.3 saves ``shared_parameters`` only when the base model sits under a prefix (a model with a
head); a bare ``BertModel`` Compacter checkpoint has no shared PHM rule, so ``strict`` import fails for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.methods.base import group_adapterhub_keys
from graphadapt.methods.registry import get_method
from graphadapt.vocab import adapter_prefix

from .module import BottleneckAdapter, load_adapterhub_state_dict
from .spec import PRESETS, Bottleneck

# AdapterHub string identifiers of bottleneck configs → graphadapt preset names.
_PRESET_ALIASES = {
    "seq_bn": "seq_bn", "pfeiffer": "seq_bn", "double_seq_bn": "double_seq_bn", "houlsby": "double_seq_bn",
    "par_bn": "par_bn", "parallel": "par_bn", "scaled_pa": "par_bn", "compacter": "compacter",
    "compacter++": "compacter++", "adapter_plus": "adapter_plus",
}
# AdapterHub's bottleneck presets with an invertible adapter (inv_adapter="nice", reduction factor 2).
_INV_PRESETS = {"seq_bn_inv": "seq_bn", "pfeiffer+inv": "seq_bn", "double_seq_bn_inv": "double_seq_bn",
                "houlsby+inv": "double_seq_bn"}
# BnConfig keys with no graphadapt field (cross_adapter must be off, inv_adapter becomes a union member; the seed
# is irrelevant).
_IGNORED = {"init_weights_seed", "cross_adapter", "inv_adapter", "inv_adapter_reduction_factor", "architecture"}

# Site path after the layer module path → role (BERT/RoBERTa/ViT, GPT-2/Llama-style mixins, T5 "layer.<k>").
_MH = re.compile(r"(^|\.)(attention\.output|attention_adapters|attn_adapters|(layer\.)?0)$")
_OUT = re.compile(r"(^|\.)(output|output_adapters|ffn_adapters|(layer\.)?[1-9])$")


def spec_from_config(config: Mapping | str):
    """AdapterHub bottleneck config (``BnConfig`` dict, whole ``adapter_config.json`` dict, or a preset name such
    as ``"seq_bn"``) → graphadapt :class:`~graphadapt.spec.Bottleneck`.

    Raises :class:`CheckpointError` for other methods (LoRA, IA3, prefix tuning, unions, …) and for bottleneck
    options graphadapt does not model (``cross_adapter``, invertible adapters).
    """
    if isinstance(config, str):
        if config.lower() in _INV_PRESETS:
            bn = PRESETS[_INV_PRESETS[config.lower()]]()
            return _with_invertible(bn, "nice", 2, bn.non_linearity)
        preset = _PRESET_ALIASES.get(config.lower())
        if preset is None:
            raise CheckpointError(f"AdapterHub config {config!r} is not a bottleneck preset the importer knows "
                                  f"(known: {', '.join(sorted(_PRESET_ALIASES))})")
        return PRESETS[preset]()
    if not isinstance(config, Mapping):
        raise CheckpointError(f"AdapterHub config must be a dict or a preset name, got {type(config).__name__}")
    if isinstance(config.get("config"), (Mapping, str)):  # whole adapter_config.json
        config = config["config"]
        if isinstance(config, str):
            return spec_from_config(config)
    arch = config.get("architecture")
    if arch not in (None, "bottleneck"):
        raise CheckpointError(f"AdapterHub architecture {arch!r} is not a bottleneck adapter")
    if config.get("cross_adapter"):
        raise CheckpointError(f"AdapterHub option cross_adapter={config['cross_adapter']!r} is not supported by the "
                              "importer yet")
    names = {f.name for f in fields(Bottleneck)} - {"seed", "layers"}
    unknown = sorted(set(config) - names - _IGNORED)
    if unknown:
        raise CheckpointError(f"AdapterHub config has options graphadapt does not know: {unknown}")
    kw = {k: v for k, v in config.items() if k in names}
    if isinstance(kw.get("leave_out"), list):
        kw["leave_out"] = tuple(kw["leave_out"])
    try:
        bn = Bottleneck(**kw)
    except (SpecError, TypeError) as e:
        raise CheckpointError(f"AdapterHub config does not translate to a graphadapt Bottleneck: {e}") from e
    if config.get("inv_adapter"):
        return _with_invertible(bn, config["inv_adapter"], config.get("inv_adapter_reduction_factor") or 2,
                                bn.non_linearity)
    return bn


def _with_invertible(bn: Bottleneck, block: str, reduction_factor: float, non_linearity: str):
    """AdapterHub's bottleneck + invertible adapter as one graphadapt adapter: ``Union(bn, invertible)`` (both
    plugins reached through the registry)."""
    if block != "nice":
        raise CheckpointError(f"AdapterHub inv_adapter={block!r} is not importable: only 'nice' (AdapterHub's GLOW "
                              "block returns a list concatenated along the sequence axis, which its own models "
                              "cannot run)")
    try:
        inv = get_method("invertible").spec_class(block=block, reduction_factor=reduction_factor,
                                                  non_linearity=non_linearity)
        return get_method("union").spec_class(bn, inv)
    except SpecError as e:
        raise CheckpointError(f"AdapterHub invertible adapter does not translate: {e}") from e


def _role(rest: str) -> str | None:
    if _MH.search(rest):
        return "mh"
    if _OUT.search(rest):
        return "output"
    return None


def _layer_path(target: str, adapter: str) -> str:
    # adapters.<name>.<layer module path>.<role>_adapter → <layer module path>
    return target[len(adapter_prefix(adapter)):].rsplit(".", 1)[0]


def _match_site(site: str, layer_paths: dict[str, list[dict]]) -> tuple[str, str] | None:
    """(layer path, rest of the site after it) for the longest layer path contained in ``site`` at dot bounds."""
    best = None
    dotted = f".{site}."
    for lp in layer_paths:
        i = dotted.find(f".{lp}.")
        if i >= 0 and (best is None or len(lp) > len(best[0])):
            best = (lp, site[i + len(lp):].lstrip("."))
    return best


def load_weights(adapted, ours_name: str, saved: str, sd: dict, strict: bool, directory) -> None:
    """Copy the AdapterHub state dict ``sd`` (adapter saved as ``saved``) into ``adapted``'s adapter ``ours_name``."""
    records = [r for r in adapted.adapter_records if r.adapter == ours_name]
    by_path: dict[str, list[dict]] = {}
    for r in records:
        by_path.setdefault(_layer_path(r.target, ours_name), []).append(r)

    # group AdapterHub keys by site prefix
    site_re = re.compile(rf"^(.*?)\.adapters\.{re.escape(saved)}\.(.+)$")
    shared_re = re.compile(rf"^(?:.*\.)?shared_parameters\.{re.escape(saved)}\.(.+)$")
    shared_sd = {m.group(1): v for k, v in sd.items() if (m := shared_re.match(k))}
    sites, unexpected = group_adapterhub_keys({k: v for k, v in sd.items() if not shared_re.match(k)}, site_re)

    filled: set[str] = set()
    loaded: dict[str, str] = {}  # graphadapt target → AdapterHub site
    for site, tensors in sites.items():
        hit = _match_site(site, by_path)
        role = _role(hit[1]) if hit else None
        rec = next((r for r in by_path[hit[0]] if r.role == role), None) if hit and role else None
        if rec is None or rec.target in loaded:
            unexpected.extend(f"{site}.adapters.{saved}.{k}" for k in tensors)
            continue
        mod = adapted.get_submodule(rec.target)
        if not isinstance(mod, BottleneckAdapter):
            raise CheckpointError(f"{rec.target} is a {type(mod).__name__}, not a bottleneck adapter")
        try:
            load_adapterhub_state_dict(mod, tensors, strict=strict)
        except RuntimeError as e:  # size mismatch from load_state_dict
            raise CheckpointError(f"AdapterHub site {site} does not fit {rec.target}: {e}") from e
        loaded[rec.target] = site
        filled.update(f"{rec.target}.{k}" for k, _ in mod.named_parameters())

    shared_prefix = adapter_prefix(ours_name) + "shared_phm"
    try:
        shared = adapted.get_submodule(shared_prefix)
    except AttributeError:
        shared = None
    with torch.no_grad():
        for k, v in shared_sd.items():
            if shared is None or k not in shared:
                unexpected.append(f"shared_parameters.{saved}.{k}")
                continue
            if shared[k].shape != v.shape:
                raise CheckpointError(f"shared PHM tensor {k}: checkpoint {tuple(v.shape)} vs model "
                                      f"{tuple(shared[k].shape)}")
            shared[k].copy_(v.to(shared[k].dtype))
            filled.add(f"{shared_prefix}.{k}")

    ours = [k for k, _ in adapted.named_parameters() if k.startswith(adapter_prefix(ours_name))]
    ours += [k for k, _ in adapted.named_buffers() if k.startswith(adapter_prefix(ours_name) + "shared_phm.")]
    missing = sorted(set(ours) - filled)
    if strict and (missing or unexpected):
        hint = (" AdapterHub does not save shared_parameters of a bare base model (no head prefix); pass "
                "strict=False to keep graphadapt's initial shared PHM tensors."
                if any(".shared_phm." in k for k in missing) else "")
        raise CheckpointError(
            f"AdapterHub checkpoint {directory} does not match this model's adapter {ours_name!r}: "
            f"{len(missing)} graphadapt tensors not filled (e.g. {missing[:3]}), {len(unexpected)} AdapterHub "
            f"tensors unused (e.g. {sorted(unexpected)[:3]}). Was it saved for the same architecture?" + hint)


_FUSION_KEY = re.compile(r"^(.*?)\.adapter_fusion_layer\.([^.]+)\.(.+)$")


def load_fusion_weights(adapted, fusion_name: str, saved: str, sd: dict, strict: bool, directory) -> None:
    """Copy an AdapterHub ``save_adapter_fusion`` state dict (fusion saved as ``saved``, e.g. ``"a,b"``) into
    ``adapted``'s fusion layers ``adapters.<fusion_name>.<site>`` (sites matched as for adapters)."""
    records = [r for r in adapted.adapter_records if r.adapter == fusion_name and r.method == "fusion"]
    if not records:
        raise CheckpointError(f"the model has no fusion layers named {fusion_name!r}; activate the Fuse block first")
    by_path: dict[str, list] = {}
    for r in records:
        by_path.setdefault(_layer_path(r.target, fusion_name), []).append(r)
    params = dict(adapted.named_parameters())
    filled, unexpected = set(), []
    with torch.no_grad():
        for k, v in sd.items():
            m = _FUSION_KEY.match(k)
            if m is None or m.group(2) != saved:
                unexpected.append(k)
                continue
            hit = _match_site(m.group(1), by_path)
            role = _role(hit[1]) if hit else None
            rec = next((r for r in by_path[hit[0]] if r.role == role), None) if hit and role else None
            ours = f"{rec.target}.{m.group(3)}" if rec is not None else None
            if ours not in params:
                unexpected.append(k)
                continue
            if params[ours].shape != v.shape:
                raise CheckpointError(f"fusion tensor {k}: checkpoint {tuple(v.shape)} vs model {tuple(params[ours].shape)}")
            params[ours].copy_(v.to(params[ours].dtype))
            filled.add(ours)
    missing = sorted(n for n in params if n.startswith(adapter_prefix(fusion_name)) and n not in filled)
    if strict and (missing or unexpected):
        raise CheckpointError(f"AdapterHub fusion checkpoint {directory} does not match fusion {fusion_name!r}: "
                              f"{len(missing)} tensors not filled (e.g. {missing[:3]}), {len(unexpected)} unused "
                              f"(e.g. {unexpected[:3]})")


__all__ = ["load_fusion_weights", "load_weights", "spec_from_config"]
