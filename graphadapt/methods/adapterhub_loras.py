"""AdapterHub's LoRA-family checkpoint format (``LoRAConfig``, ``architecture="lora"``), shared by the plugins that
read it (``add`` → the LoRA plugin, ``scale`` → the IA3 plugin): config parsing and weight loading. Not a method:
a format both use, as :mod:`.sliced` is a site geometry both use; it speaks AdapterHub's vocabulary.

AdapterHub's LoRA family shares one config (``architecture="lora"``): ``composition_mode="add"`` is LoRA,
``"scale"`` is IA3 (``IA3Config`` = ``LoRAConfig(r=1, alpha=1, composition_mode="scale", init_weights="ia3",
attn_matrices=["k", "v"], intermediate_lora=True)``). Where it goes, in graphadapt roles:

    selfattn_lora      → attn_matrices (``q``/``k``/``v``; every attention block, cross-attention included)
    intermediate_lora  → ``up``   (BERT ``intermediate.dense``, GPT-2 ``mlp.c_fc``, T5 ``wi``/``wi_1``)
    output_lora        → ``down`` (BERT ``output.dense``, GPT-2 ``mlp.c_proj``, T5 ``wo``)

AdapterHub's Llama/Mistral mixins wrap ``mlp.down_proj`` as "intermediate" and ``mlp.up_proj`` as "output"
(the other way round); :func:`checkpoint_spec` reads the checkpoint's module names and follows it.
The FFN gate projection (``gate_proj``) is never wrapped.

Keys: ``[<prefix>.]<module path>.loras.<name>.{lora_A, lora_B, gate.weight, gate.bias}``. IA3 has ``lora_B``
only ([out, 1] = our ``ia3_l``). A fused projection (GPT-2 ``c_attn``) holds one stacked tensor for all its
adapted slices (q, k, v order, ``r`` rows of ``lora_A`` / ``out`` rows of ``lora_B`` / one gate head each);
it is split over graphadapt's per-slice modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from graphadapt.errors import CheckpointError, SpecError
from .base import group_adapterhub_keys

# AdapterHub's LoRAConfig / IA3Config defaults (adapters 1.3), for preset names and omitted keys.
LORA_DEFAULTS = {
    "architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
    "leave_out": [], "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
    "init_weights": "lora", "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None,
    "vera_b": None, "dtype": None,
}
IA3_DEFAULTS = {**LORA_DEFAULTS, "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"],
                "composition_mode": "scale", "init_weights": "ia3"}
VERA_DEFAULTS = {**LORA_DEFAULTS, "vera_d": 0.1, "vera_b": 0.0, "init_weights": "vera"}
_PRESETS = {"lora": LORA_DEFAULTS, "ia3": IA3_DEFAULTS, "vera": VERA_DEFAULTS,
            "dvora": {**VERA_DEFAULTS, "use_dora": True}, "dora": {**LORA_DEFAULTS, "use_dora": True}}


def lora_variant(cfg: Mapping) -> str:
    """Which AdapterHub module a full ``add``-mode config builds: ``"vera"`` (``vera_d``/``vera_b`` set, DVoRA
    with ``use_dora``) or ``"lora"`` (plain, or DoRA with ``use_dora``)."""
    return "vera" if cfg.get("vera_d") is not None or cfg.get("vera_b") is not None else "lora"


def config_dict(config: Mapping | str, mode: str) -> dict | None:
    """The full LoRAConfig dict if it is ``mode`` ("add"/"scale"), else None (another plugin's)."""
    if isinstance(config, str):
        preset = _PRESETS.get(config.lower())
        if preset is None or preset["composition_mode"] != mode:
            return None
        return dict(preset)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"AdapterHub config must be a dict or a preset name, got {type(config).__name__}")
    if isinstance(config.get("config"), (Mapping, str)):  # whole adapter_config.json
        return config_dict(config["config"], mode)
    if config.get("architecture") != "lora":
        return None
    cfg = {**LORA_DEFAULTS, **config}
    if cfg["composition_mode"] not in ("add", "scale"):
        raise CheckpointError(f"AdapterHub LoRA composition_mode {cfg['composition_mode']!r} is unknown "
                              "(expected 'add' = LoRA or 'scale' = IA3)")
    if cfg["composition_mode"] != mode:
        return None
    unknown = sorted(set(config) - set(LORA_DEFAULTS))
    if unknown:
        raise CheckpointError(f"AdapterHub LoRA config has options graphadapt does not know: {unknown} "
                              "(MTL-LoRA and other LoRA variants are not supported by the importer)")
    return cfg


def targets(cfg: dict) -> tuple[str, ...]:
    attn = cfg["attn_matrices"]
    if isinstance(attn, str) or not all(a in ("q", "k", "v") for a in attn):
        raise CheckpointError(f"AdapterHub attn_matrices must be a list of 'q', 'k', 'v'; got {attn!r}")
    roles = [a for a in ("q", "k", "v") if a in attn] if cfg["selfattn_lora"] else []
    if cfg["intermediate_lora"]:
        roles.append("up")
    if cfg["output_lora"]:
        roles.append("down")
    if not roles:
        raise CheckpointError("AdapterHub LoRA config adapts nothing (selfattn_lora, intermediate_lora and "
                              "output_lora are all off, or attn_matrices is empty)")
    return tuple(roles)


def leave_out(cfg: dict) -> tuple[int, ...]:
    return tuple(cfg.get("leave_out") or ())


_FFN_LEAF_ROLE = {"up_proj": "up", "down_proj": "down"}


def _site_re(saved: str) -> re.Pattern:
    return re.compile(rf"^(.*)\.loras\.{re.escape(saved)}\.(.+)$")


def checkpoint_spec(spec, state_dict: Mapping[str, torch.Tensor], saved: str):
    """Follow the checkpoint where AdapterHub's FFN location names differ by model: Llama-style mixins put
    "intermediate" on ``down_proj`` and "output" on ``up_proj``."""
    site_re = _site_re(saved)
    found = {_FFN_LEAF_ROLE[m.group(1).rsplit(".", 1)[-1]] for k in state_dict for m in [site_re.match(k)]
             if m and m.group(1).rsplit(".", 1)[-1] in _FFN_LEAF_ROLE}
    ffn = {t for t in spec.targets if t in ("up", "down")}
    if not found or found == ffn:
        return spec
    return spec.replace(targets=tuple(t for t in spec.targets if t not in ("up", "down"))
                        + tuple(r for r in ("up", "down") if r in found))


def _match(path: str, ours: Mapping[str, list]) -> str | None:
    """Our module path for a checkpoint module path, allowing a wrapper prefix (``bert.``) on either side."""
    hits = [q for q in ours if q == path or path.endswith("." + q) or q.endswith("." + path)]
    if len(hits) > 1:
        hits = [q for q in hits if q == path] or hits
    return hits[0] if len(hits) == 1 else None


def _ah_tensors(mod) -> dict[str, torch.nn.Parameter]:
    """AdapterHub tensor name → our parameter: the module says (``adapterhub_tensors()``, the protocol of modules
    read from this format)."""
    return mod.adapterhub_tensors()


def load_weights(adapted, ours_name: str, saved: str, sd: Mapping[str, torch.Tensor], strict: bool,
                 directory) -> None:
    """Copy the AdapterHub LoRA/IA3 state dict ``sd`` (adapter ``saved``) into ``adapted``'s adapter ``ours_name``."""
    by_path: dict[str, list] = {}
    for r in adapted.adapter_records:
        if r.adapter != ours_name:
            continue
        mod = adapted.get_submodule(r.target)
        path = r.site if mod.out_slice is None and mod.out_rows is None else r.site.rsplit(".", 1)[0]
        group = by_path.setdefault(path, [])
        if all(m is not mod for _, m in group):
            group.append((r.target, mod))
    for group in by_path.values():
        group.sort(key=lambda tm: (tm[1].out_slice or (0, 0))[0])  # fused slices in channel (q, k, v) order

    site_re = _site_re(saved)
    sites, unexpected = group_adapterhub_keys(sd, site_re)

    filled: set[str] = set()
    done: set[str] = set()
    with torch.no_grad():
        for site, tensors in sites.items():
            path = _match(site, by_path)
            if path is None or path in done:
                unexpected.extend(f"{site}.loras.{saved}.{k}" for k in tensors)
                continue
            done.add(path)
            group = by_path[path]
            if any(m.out_rows is not None for _, m in group):
                raise CheckpointError(
                    f"AdapterHub tensors for {site} target a head-interleaved fused projection; reading them "
                    "into its q/k/v row sets is not supported. Target the projection by module path instead.")
            fused_partial = group[0][1].out_slice is not None and \
                sum(m.out_features for _, m in group) != group[0][1].total_out
            for key, value in tensors.items():
                params = [(t, _ah_tensors(m).get(key)) for t, m in group]
                if any(p is None for _, p in params):
                    unexpected.append(f"{site}.loras.{saved}.{key}")
                    continue
                rows = sum(p.shape[0] for _, p in params)
                if value.dim() == 2 and value.shape[1] == 1 and params[0][1].dim() == 1:  # DoRA's m: [out, 1]
                    value = value[:, 0]
                if value.shape[0] != rows or tuple(value.shape[1:]) != tuple(params[0][1].shape[1:]):
                    raise CheckpointError(
                        f"AdapterHub tensor {site}.loras.{saved}.{key} {tuple(value.shape)} does not fit "
                        f"{[t for t, _ in params]} (expected {(rows, *params[0][1].shape[1:])}); was it saved for "
                        "the same architecture and config?")
                start = 0
                for t, p in params:
                    p.copy_(value[start:start + p.shape[0]].to(p.dtype))
                    start += p.shape[0]
                    filled.add(f"{t}.{key}")
            for t, m in group:
                if fused_partial and getattr(m, "alpha", 1.0) != 1.0 and m.gate is None:
                    raise CheckpointError(
                        f"AdapterHub IA3 with alpha={m.alpha:g} on the fused projection {site} also multiplies the "
                        "channels it does not adapt by alpha; graphadapt does not reproduce that (alpha=1 only)")

    ours = {f"{t}.{k}" for group in by_path.values() for t, m in group for k in _ah_tensors(m)}
    missing = sorted(ours - filled)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"AdapterHub checkpoint {directory} does not match this model's adapter {ours_name!r}: "
            f"{len(missing)} graphadapt tensors not filled (e.g. {missing[:3]}), {len(unexpected)} AdapterHub "
            f"tensors unused (e.g. {sorted(unexpected)[:3]}). Was it saved for the same architecture?")


__all__ = ["IA3_DEFAULTS", "LORA_DEFAULTS", "VERA_DEFAULTS", "lora_variant", "checkpoint_spec", "config_dict", "leave_out", "load_weights", "targets"]
