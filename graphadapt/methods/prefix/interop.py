"""Prefix tuning checkpoints: AdapterHub (``architecture: "prefix_tuning"``) and PEFT (``PREFIX_TUNING``).

AdapterHub keys (``model.save_adapter``)::

    [<base>.]prefix_tuning.prefix_tunings.<name>.<location>.{wte.weight, control_trans.{0,2}.{weight,bias}}
    [<base>.]prefix_tuning.prefix_tunings.<name>.<location>.control_trans            (flat)
    <attention module path>.prefix_tuning.pool.prefix_tunings.<name>.…               (the same pool, once per layer)
    <attention module path>.prefix_tuning.prefix_gates.<name>.{weight,bias}         (use_gating)

ours: ``adapters.<name>.prefix.generators.<location>.…`` and ``adapters.<name>.<layer path>.<location>.gate.…``.

PEFT keeps one tensor, ``prompt_embeddings`` ``[num_virtual_tokens, layers·2·kv_heads·head_dim]`` — the
projected prefix when ``prefix_projection`` — which is a flat prefix. PEFT feeds it as ``past_key_values``,
so the real tokens' positions start at ``num_virtual_tokens`` (AdapterHub keeps them at 0): the imported
spec sets ``position_offset=True``, which shifts the position ids computed in the graph the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.vocab import SiteKind, adapter_prefix

from .spec import PrefixTuning

_FIELDS = ("prefix_length", "bottleneck_size", "non_linearity", "flat", "dropout", "encoder_prefix", "cross_prefix",
           "leave_out", "use_gating", "shared_gating")
_IGNORED = {"architecture", "init_weights_seed"}
_PRESETS = {"prefix_tuning": {}, "prefix_tuning_flat": {"flat": True}}
_CROSS = re.compile(r"(^|\.)(crossattention|EncDecAttention|encoder_attn)(\.|$)")


def spec_from_adapterhub(config: Mapping | str) -> PrefixTuning | None:
    if isinstance(config, str):
        return PrefixTuning(**_PRESETS[config]) if config in _PRESETS else None
    if config.get("architecture") != "prefix_tuning":
        return None
    unknown = sorted(set(config) - set(_FIELDS) - _IGNORED)
    if unknown:
        raise CheckpointError(f"AdapterHub prefix tuning config has options graphadapt does not know: {unknown}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in _FIELDS}
    try:
        return PrefixTuning(**kw)
    except (SpecError, TypeError) as e:
        raise CheckpointError(f"AdapterHub config does not translate to graphadapt PrefixTuning: {e}") from e


def _records(adapted, adapter: str) -> list:
    prefix = adapter_prefix(adapter)
    return [r for r in adapted.adapter_records if r.target.startswith(prefix)]


def load_adapterhub(adapted, adapter: str, saved: str, sd: dict, strict: bool, directory) -> None:
    """Copy AdapterHub prefix tuning tensors (adapter saved as ``saved``) into ``adapted``'s ``adapter``."""
    pool_re = re.compile(rf"^(?:.*\.)?prefix_tuning\.(?:pool\.)?prefix_tunings\.{re.escape(saved)}\.(\w+)\.(.+)$")
    gate_re = re.compile(rf"^(.*)\.prefix_tuning\.prefix_gates\.{re.escape(saved)}\.(weight|bias)$")
    pre = adapter_prefix(adapter)
    params = {k: p for k, p in adapted.named_parameters() if k.startswith(pre)}
    recs = _records(adapted, adapter)
    filled, unexpected = set(), []

    def put(ours: str, value: torch.Tensor, key: str) -> None:
        p = params.get(ours)
        if p is None:
            unexpected.append(key)
            return
        if p.shape != value.shape:
            raise CheckpointError(f"AdapterHub tensor {key} {tuple(value.shape)} does not fit {ours} "
                                  f"{tuple(p.shape)}; was it saved for the same architecture?")
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
        filled.add(ours)

    for key, value in sd.items():
        m = pool_re.match(key)
        if m:
            put(f"{pre}prefix.generators.{m.group(1)}.{m.group(2)}", value, key)
            continue
        m = gate_re.match(key)
        if m:
            path = f".{m.group(1)}."
            cands = [r for r in recs if r.kind == SiteKind.ATTENTION and
                     f".{r.target[len(pre):].rsplit('.', 1)[0]}." in path]
            best = max((len(r.target) for r in cands), default=0)
            cands = [r for r in cands if len(r.target) == best]
            want = "cross_prefix" if _CROSS.search(m.group(1)) else None
            hit = [r for r in cands if (r.role == want if want else r.role != "cross_prefix")]
            if len(hit) != 1:
                unexpected.append(key)
                continue
            put(f"{hit[0].target}.gate.{m.group(2)}", value, key)
            continue
        unexpected.append(key)
    missing = sorted(set(params) - filled)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"AdapterHub checkpoint {directory} does not match this model's prefix adapter {adapter!r}: "
            f"{len(missing)} graphadapt tensors not filled (e.g. {missing[:3]}), {len(unexpected)} AdapterHub "
            f"tensors unused (e.g. {sorted(unexpected)[:3]}). Was it saved for the same architecture?")


def read_peft_prefix(model, cfg: Mapping, weights: dict, name: str, directory):
    """``(spec, fill)`` for a PEFT ``PREFIX_TUNING`` checkpoint (a flat prefix; see the module docstring)."""
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError("PEFT prefix tuning for encoder-decoder models (num_transformer_submodules=2) is not "
                              "supported by the importer yet")
    emb = weights.get("prompt_embeddings")
    extra = sorted(set(weights) - {"prompt_embeddings"})
    if emb is None or extra:
        raise CheckpointError(f"{directory}: expected exactly one tensor 'prompt_embeddings' in a PEFT prefix "
                              f"tuning checkpoint, found {sorted(weights)}")
    p = int(cfg["num_virtual_tokens"])
    if emb.dim() != 2 or emb.shape[0] != p:
        raise CheckpointError(f"{directory}: prompt_embeddings has shape {tuple(emb.shape)}, expected "
                              f"[{p}, layers·2·kv_heads·head_dim]")
    spec = PrefixTuning(prefix_length=p, flat=True, position_offset=True)

    def fill(adapted) -> None:
        target = f"{adapter_prefix(name)}prefix.generators.self_prefix.control_trans"
        params = dict(adapted.named_parameters())
        others = sorted(k for k in params if k.startswith(adapter_prefix(name)) and k != target)
        if target not in params or others:
            raise CheckpointError(f"PEFT prefix checkpoint {directory}: this model's prefix adapter has tensors "
                                  f"{others[:3] or 'none'} besides {target}; PEFT's layout is decoder self-attention only")
        t = params[target]
        if t.numel() != emb.numel():
            raise CheckpointError(f"PEFT prompt_embeddings {tuple(emb.shape)} do not fit this model's prefix "
                                  f"({t.numel()} values = {p} tokens × layers·2·kv_heads·head_dim); was it trained on "
                                  "another architecture?")
        with torch.no_grad():
            t.copy_(emb.reshape(-1).to(t.dtype))

    return spec, fill


__all__ = ["load_adapterhub", "read_peft_prefix", "spec_from_adapterhub"]
