"""Import bottleneck adapters saved by AdapterHub (``adapters``) ``model.save_adapter(dir, name)``.

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

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch

from ..errors import CheckpointError, SpecError
from . import read_json, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "adapter_model.safetensors", "pytorch_adapter.bin")

# AdapterHub string identifiers of bottleneck configs → graphadapt preset names.
_PRESET_ALIASES = {
    "seq_bn": "seq_bn", "pfeiffer": "seq_bn", "double_seq_bn": "double_seq_bn", "houlsby": "double_seq_bn",
    "par_bn": "par_bn", "parallel": "par_bn", "scaled_pa": "par_bn", "compacter": "compacter",
    "compacter++": "compacter++", "adapter_plus": "adapter_plus",
}
# BnConfig keys with no graphadapt field (cross_adapter / inv_adapter must be off; the seed is irrelevant).
_IGNORED = {"init_weights_seed", "cross_adapter", "inv_adapter", "inv_adapter_reduction_factor", "architecture"}

# Site path after the layer module path → role (BERT/RoBERTa/ViT, GPT-2/Llama-style mixins, T5 "layer.<k>").
_MH = re.compile(r"(^|\.)(attention\.output|attention_adapters|attn_adapters|(layer\.)?0)$")
_OUT = re.compile(r"(^|\.)(output|output_adapters|ffn_adapters|(layer\.)?[1-9])$")

__all__ = ["import_adapterhub", "from_adapterhub_config", "read_adapterhub"]


def _method_name(cfg: Mapping) -> str:
    arch = cfg.get("architecture")
    if arch == "lora" and cfg.get("composition_mode") == "scale":
        return "ia3"
    if arch == "lora" and (cfg.get("vera_d") is not None or cfg.get("vera_b") is not None):
        return "vera"
    return str(arch)


def from_adapterhub_config(config: Mapping | str):
    """AdapterHub bottleneck config (``BnConfig`` dict, whole ``adapter_config.json`` dict, or a preset name such
    as ``"seq_bn"``) → graphadapt :class:`~graphadapt.spec.Bottleneck`.

    Raises :class:`CheckpointError` for other methods (LoRA, IA3, prefix tuning, unions, …) and for bottleneck
    options graphadapt does not model (``cross_adapter``, invertible adapters).
    """
    from ..spec.bottleneck import PRESETS, Bottleneck

    if isinstance(config, str):
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
            return from_adapterhub_config(config)
    arch = config.get("architecture")
    if arch not in (None, "bottleneck"):
        raise CheckpointError(f"AdapterHub {_method_name(config)!r} adapters are not supported by the importer yet "
                              "(only bottleneck adapters: SeqBn, DoubleSeqBn, ParBn, AdapterPlus, Compacter, …)")
    for k in ("cross_adapter", "inv_adapter"):
        if config.get(k):
            raise CheckpointError(f"AdapterHub option {k}={config[k]!r} is not supported by the importer yet")
    names = {f.name for f in fields(Bottleneck)} - {"seed", "layers"}
    unknown = sorted(set(config) - names - _IGNORED)
    if unknown:
        raise CheckpointError(f"AdapterHub config has options graphadapt does not know: {unknown}")
    kw = {k: v for k, v in config.items() if k in names}
    if isinstance(kw.get("leave_out"), list):
        kw["leave_out"] = tuple(kw["leave_out"])
    try:
        return Bottleneck(**kw)
    except (SpecError, TypeError) as e:
        raise CheckpointError(f"AdapterHub config does not translate to a graphadapt Bottleneck: {e}") from e


def read_adapterhub(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``(adapter_config.json dict, state dict)`` from an AdapterHub ``save_adapter`` directory."""
    d = Path(directory)
    if not (d / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} is not an AdapterHub adapter directory (no {CONFIG_FILE})")
    meta = read_json(d / CONFIG_FILE)
    for fname in WEIGHT_FILES:
        p = d / fname
        if p.exists():
            # pytorch_adapter.bin is AdapterHub's default format: read, but only with weights_only=True
            sd = read_tensors(p, allow_pickle=True)
            bad = [k for k, v in sd.items() if not v.is_floating_point()]
            if bad:
                raise CheckpointError(f"{p}: adapter tensor {bad[0]!r} is {sd[bad[0]].dtype}, not floating point; "
                                      "refusing to cast it. Is this an AdapterHub adapter checkpoint?")
            return meta, sd
    raise CheckpointError(f"no AdapterHub weights in {directory} (looked for {', '.join(WEIGHT_FILES)})")


def _role(rest: str) -> str | None:
    if _MH.search(rest):
        return "mh"
    if _OUT.search(rest):
        return "output"
    return None


def _layer_path(target: str, adapter: str) -> str:
    # adapters.<name>.<layer module path>.<role>_adapter → <layer module path>
    return target[len(f"adapters.{adapter}."):].rsplit(".", 1)[0]


def _match_site(site: str, layer_paths: dict[str, list[dict]]) -> tuple[str, str] | None:
    """(layer path, rest of the site after it) for the longest layer path contained in ``site`` at dot bounds."""
    best = None
    dotted = f".{site}."
    for lp in layer_paths:
        i = dotted.find(f".{lp}.")
        if i >= 0 and (best is None or len(lp) > len(best[0])):
            best = (lp, site[i + len(lp):].lstrip("."))
    return best


def import_adapterhub(model: torch.nn.Module, directory: str | os.PathLike, name: str | None = None,
                      strict: bool = True, **apply_kwargs):
    """Apply the AdapterHub bottleneck adapter saved in ``directory`` to ``model`` and load its weights.

    ``name``: graphadapt adapter name (default: the saved name). ``apply_kwargs`` go to :func:`graphadapt.apply`.
    ``strict``: every AdapterHub adapter tensor must land in a graphadapt tensor and every graphadapt adapter
    tensor must be filled, else :class:`CheckpointError` (with ``strict=False`` unfilled tensors keep their
    initial values and unmatched AdapterHub tensors are ignored). Returns the :class:`AdaptedModel`.
    """
    from ..api import apply
    from ..modules.bottleneck import BottleneckAdapter, load_adapterhub_state_dict
    from ..spec import Spec

    meta, sd = read_adapterhub(directory)
    spec = from_adapterhub_config(meta)
    saved = meta.get("name")
    if saved is None:
        found = {m.group(1) for k in sd for m in [re.search(r"(?:^|\.)(?:adapters|shared_parameters)\.([^.]+)\.", k)]
                 if m}
        if len(found) != 1:
            raise CheckpointError(f"{directory}: cannot tell the adapter name (adapter_config.json has no 'name'; "
                                  f"keys name {sorted(found)})")
        saved = found.pop()
    ours_name = name or saved
    adapted = apply(model, Spec({ours_name: spec}), **apply_kwargs)

    records = [r for r in adapted.adapter_records if r["adapter"] == ours_name]
    by_path: dict[str, list[dict]] = {}
    for r in records:
        by_path.setdefault(_layer_path(r["target"], ours_name), []).append(r)

    # group AdapterHub keys by site prefix
    site_re = re.compile(rf"^(.*?)\.adapters\.{re.escape(saved)}\.(.+)$")
    shared_re = re.compile(rf"^(?:.*\.)?shared_parameters\.{re.escape(saved)}\.(.+)$")
    sites: dict[str, dict[str, torch.Tensor]] = {}
    shared_sd: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in sd.items():
        m = shared_re.match(k)
        if m:
            shared_sd[m.group(1)] = v
            continue
        m = site_re.match(k)
        if m:
            sites.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            unexpected.append(k)

    filled: set[str] = set()
    loaded: dict[str, str] = {}  # graphadapt target → AdapterHub site
    for site, tensors in sites.items():
        hit = _match_site(site, by_path)
        role = _role(hit[1]) if hit else None
        rec = next((r for r in by_path[hit[0]] if r["role"] == role), None) if hit and role else None
        if rec is None or rec["target"] in loaded:
            unexpected.extend(f"{site}.adapters.{saved}.{k}" for k in tensors)
            continue
        mod = adapted.get_submodule(rec["target"])
        assert isinstance(mod, BottleneckAdapter)
        try:
            load_adapterhub_state_dict(mod, tensors, strict=strict)
        except RuntimeError as e:  # size mismatch from load_state_dict
            raise CheckpointError(f"AdapterHub site {site} does not fit {rec['target']}: {e}") from e
        loaded[rec["target"]] = site
        filled.update(f"{rec['target']}.{k}" for k, _ in mod.named_parameters())

    shared_prefix = f"adapters.{ours_name}.shared_phm"
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

    ours = [k for k, _ in adapted.named_parameters() if k.startswith(f"adapters.{ours_name}.")]
    ours += [k for k, _ in adapted.named_buffers() if k.startswith(f"adapters.{ours_name}.shared_phm.")]
    missing = sorted(set(ours) - filled)
    if strict and (missing or unexpected):
        hint = (" AdapterHub does not save shared_parameters of a bare base model (no head prefix); pass "
                "strict=False to keep graphadapt's initial shared PHM tensors."
                if any(".shared_phm." in k for k in missing) else "")
        raise CheckpointError(
            f"AdapterHub checkpoint {directory} does not match this model's adapter {ours_name!r}: "
            f"{len(missing)} graphadapt tensors not filled (e.g. {missing[:3]}), {len(unexpected)} AdapterHub "
            f"tensors unused (e.g. {sorted(unexpected)[:3]}). Was it saved for the same architecture?" + hint)
    return adapted
