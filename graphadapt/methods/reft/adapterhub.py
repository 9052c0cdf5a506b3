"""AdapterHub ReFT checkpoints (``architecture: "reft"``: ``loreft``, ``noreft``, ``direft``) → graphadapt.

Keys: ``<layer path>.reft_layer.refts.<name>.units.<i>.learned_source.{weight,bias}`` and either
``units.<i>.projection.weight`` or, with ``orthogonality``, torch's parametrisation tensors
``units.<i>.projection.parametrizations.weight.original`` and ``….weight.0.base`` (the trivialisation base).
``<layer path>`` is the layer module (``encoder.layer.3``, ``h.3``, ``layers.3``, under any model prefix).

AdapterHub 1.3 does not write ``subtract_projection`` into ``adapter_config.json`` (a class attribute of its
config, not a field): a saved ``direft`` adapter reads back, in AdapterHub's own ``load_adapter`` too, as
``subtract_projection=True``. The importer does the same, and honours an explicit ``"subtract_projection"`` key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from graphadapt.errors import CheckpointError, SpecError
from graphadapt.vocab import adapter_prefix

from .module import ReftIntervention
from .spec import PRESETS, Reft

_KNOWN = {"architecture", "layers", "prefix_positions", "suffix_positions", "r", "orthogonality", "tied_weights",
          "subtract_projection", "dropout", "non_linearity", "dtype", "output_reft", "init_weights_seed"}
_KEY = re.compile(r"^(.*?)\.?reft_layer\.refts\.([^.]+)\.units\.(\d+)\.(.+)$")
_TENSOR = {"learned_source.weight": "learned_source.weight", "learned_source.bias": "learned_source.bias",
           "projection.weight": "projection_weight",
           "projection.parametrizations.weight.original": "projection_original",
           "projection.parametrizations.weight.0.base": "projection_base"}


def spec_from_config(config: Mapping | str) -> Reft | None:
    if isinstance(config, str):
        cls = PRESETS.get(config.lower())
        return cls() if cls is not None else None
    if config.get("architecture") != "reft":
        return None
    unknown = sorted(set(config) - _KNOWN)
    if unknown:
        raise CheckpointError(f"AdapterHub ReFT config has options graphadapt does not know: {unknown}")
    if config.get("dtype") not in (None, "float32"):
        raise CheckpointError(f"AdapterHub ReFT dtype={config['dtype']!r} is not supported by the importer; import "
                              "in float32, then move the adapted model with .to(dtype)")
    if config.get("output_reft", True) is not True:
        raise CheckpointError("AdapterHub ReFT with output_reft=False places no intervention; nothing to import")
    layers = config.get("layers", "all")
    kw = {k: config[k] for k in ("prefix_positions", "suffix_positions", "r", "orthogonality", "tied_weights",
                                 "subtract_projection", "dropout", "non_linearity") if k in config}
    try:
        return Reft(layers=None if layers == "all" else tuple(layers), **kw)
    except (SpecError, TypeError) as e:
        raise CheckpointError(f"AdapterHub ReFT config does not translate to a graphadapt Reft: {e}") from e


def load_weights(adapted, ours: str, saved: str, sd: Mapping[str, torch.Tensor], strict: bool, directory) -> None:
    """Copy AdapterHub's ReFT tensors of ``saved`` into adapter ``ours`` (layers matched by module path)."""
    paths = {}
    for rec in adapted.adapter_records:
        if rec.adapter == ours:
            paths[rec.target[len(adapter_prefix(ours)):].rsplit(".", 1)[0]] = rec.target
    params = dict(adapted.named_parameters())
    params.update(adapted.named_buffers())
    filled, unexpected = set(), []
    with torch.no_grad():
        for k, v in sd.items():
            m = _KEY.match(k)
            if m is None or m.group(2) != saved or m.group(4) not in _TENSOR:
                unexpected.append(k)
                continue
            dotted = f".{m.group(1)}."
            hits = [p for p in paths if f".{p}." in dotted]
            if not hits:
                unexpected.append(k)
                continue
            target = paths[max(hits, key=len)]
            mod = adapted.get_submodule(target)
            if not isinstance(mod, ReftIntervention):
                raise CheckpointError(f"{target} is a {type(mod).__name__}, not a ReFT intervention")
            name = f"{target}.units.{m.group(3)}.{_TENSOR[m.group(4)]}"
            if name not in params:
                unexpected.append(k)
                continue
            if params[name].shape != v.shape:
                raise CheckpointError(f"AdapterHub tensor {k}: checkpoint {tuple(v.shape)} vs model "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(v.to(params[name].dtype))
            filled.add(name)
    missing = sorted(n for n in params if n.startswith(adapter_prefix(ours)) and n not in filled)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"AdapterHub checkpoint {directory} does not match this model's ReFT adapter {ours!r}: {len(missing)} "
            f"graphadapt tensors not filled (e.g. {missing[:3]}), {len(unexpected)} AdapterHub tensors unused "
            f"(e.g. {sorted(unexpected)[:3]}). Was it saved for the same architecture and layers?")


__all__ = ["load_weights", "spec_from_config"]
