"""Import adapters saved by AdapterHub (``adapters``) ``model.save_adapter(dir, name)``.

before: an AdapterHub adapter directory (``adapter_config.json`` + ``pytorch_adapter.bin`` or
        ``adapter.safetensors``)
after:  ``graphadapt.apply(model, spec)`` with AdapterHub's weights in place — the same outputs.

This module is generic: it reads the directory, finds the method plugin whose
``adapterhub_architectures`` holds the config's ``architecture`` and lets it translate the
config (``adapterhub_spec``) and load the tensors (``load_adapterhub``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..methods import get_method, registered
from ..spec.composition import FUSION_OPTIONS, Fuse
from .files import read_json, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "adapter_model.safetensors", "pytorch_adapter.bin")

__all__ = ["from_adapterhub_config", "read_adapterhub", "read_adapterhub_adapter", "read_adapterhub_fusion"]

FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHT_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")


def _method_name(cfg: Mapping) -> str:
    """A readable method name for an AdapterHub config (its LoRA family shares ``architecture="lora"``)."""
    arch = cfg.get("architecture")
    if arch == "lora" and cfg.get("composition_mode") == "scale":
        return "ia3"
    if arch == "lora" and (cfg.get("vera_d") is not None or cfg.get("vera_b") is not None):
        return "vera"
    return str(arch)


def _plugin_for(config: Mapping | str):

    if isinstance(config, str):
        return [m for m in registered() if m.adapterhub_architectures], None
    arch = config.get("architecture")
    hits = [m for m in registered() if arch in m.adapterhub_architectures]
    if not hits:
        known = sorted({str(a) for m in registered() for a in m.adapterhub_architectures if a})
        raise CheckpointError(f"AdapterHub {_method_name(config)!r} adapters are not supported by the importer yet "
                              f"(supported architectures: {', '.join(known)})")
    return hits, arch


def _inner_config(config):
    if isinstance(config, Mapping) and isinstance(config.get("config"), (Mapping, str)):  # whole adapter_config.json
        return config["config"]
    return config


def from_adapterhub_config(config: Mapping | str):
    """AdapterHub config (config dict, whole ``adapter_config.json`` dict, or a preset name such as ``"seq_bn"``)
    → the equivalent graphadapt method spec. Raises :class:`CheckpointError` when no method plugin takes it."""
    config = _inner_config(config)
    if not isinstance(config, (Mapping, str)):
        raise CheckpointError(f"AdapterHub config must be a dict or a preset name, got {type(config).__name__}")
    plugins, _ = _plugin_for(config)
    errors = []
    for m in plugins:
        try:
            spec = m.adapterhub_spec(config)
        except CheckpointError as e:
            errors.append(e)
            continue
        if spec is not None:
            return spec
    if errors:
        raise errors[0]
    raise CheckpointError(f"AdapterHub config {config!r} is not one the importer knows")


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


def read_adapterhub_adapter(directory: str | os.PathLike):
    """``(spec, saved adapter name, fill(adapted, name, strict))`` for an AdapterHub adapter directory.

    :func:`graphadapt.import_adapterhub` applies the spec and calls ``fill``, which hands the
    tensors to the method plugin (``load_adapterhub``)."""

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
    # optional plugin hook: settle what the config alone leaves open from the checkpoint's own names
    refine = getattr(get_method(spec), "adapterhub_checkpoint_spec", None)
    if refine is not None:
        spec = refine(spec, sd, saved)

    def fill(adapted, ours_name: str, strict: bool = True) -> None:
        get_method(spec).load_adapterhub(adapted, ours_name, saved, sd, strict, directory)

    return spec, saved, fill


def read_adapterhub_fusion(directory: str | os.PathLike, name: str | None = None):
    """``(Fuse block, fill(adapted, plugin, strict))`` for an AdapterHub ``save_adapter_fusion`` directory.

    The block fuses the adapters the checkpoint names (``"a,b"`` → ``Fuse("a", "b")``) with its
    fusion options; its fusion layers are named ``name`` (default: the adapters joined by ``_``)."""

    d = Path(directory)
    if not (d / FUSION_CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} is not an AdapterHub fusion directory (no {FUSION_CONFIG_FILE})")
    meta = read_json(d / FUSION_CONFIG_FILE)
    saved = meta.get("name")
    if not isinstance(saved, str) or not saved:
        raise CheckpointError(f"{d / FUSION_CONFIG_FILE} names no fusion")
    cfg = meta.get("config") or {}
    options = {k: bool(v) for k, v in cfg.items() if k in FUSION_OPTIONS}
    block = Fuse(*saved.split(","), name=name, **options)
    for fname in FUSION_WEIGHT_FILES:
        p = d / fname
        if p.exists():
            sd = read_tensors(p, allow_pickle=True)  # AdapterHub's default .bin: weights_only=True
            break
    else:
        raise CheckpointError(f"no AdapterHub fusion weights in {directory} (looked for {', '.join(FUSION_WEIGHT_FILES)})")

    def fill(adapted, plugin, strict: bool = True) -> None:
        plugin.load_adapterhub_fusion(adapted, block.fusion_name, saved, sd, strict, directory)

    return block, fill
