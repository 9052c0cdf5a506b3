"""Read PEFT checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``) for import.

before: a directory written by ``peft_model.save_pretrained(dir)``
after:  ``(spec, fill)``: :func:`graphadapt.import_peft` applies ``spec`` and ``fill`` copies
        PEFT's tensors in — the same outputs as PEFT.

Generic over methods: the plugin whose ``peft_type`` equals the config's translates the
config (``peft_spec``) and names each tensor (``peft_key``). The adapted module paths are
read from the checkpoint's keys (not re-derived from ``target_modules``), so what PEFT
adapted is exactly what graphadapt adapts, even when the checkpoint was trained on a
wrapper of ``model`` (``bert.encoder…`` vs ``encoder…``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from ..methods import registered
from ..vocab import adapter_prefix
from .files import check_tensor, read_json, read_tensors
from .trainable import trainable_module_keys


def _read(directory: Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} is not a PEFT checkpoint (no adapter_config.json)")
    cfg = read_json(cfg_path)
    st, binf = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st.exists():
        weights = read_tensors(st)
    elif binf.exists():  # a pickle: refused unless allow_pickle (docs/reliability.md)
        weights = read_tensors(binf, allow_pickle=allow_pickle)
    else:
        raise CheckpointError(f"no adapter_model.safetensors or adapter_model.bin in {directory}")
    return cfg, weights


def read_peft_config(directory: str | os.PathLike) -> dict:
    """The checkpoint's ``adapter_config.json`` (CheckpointError when the directory has none)."""
    cfg_path = Path(directory) / "adapter_config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} is not a PEFT checkpoint (no adapter_config.json)")
    return read_json(cfg_path)


def _resolve(ckpt_path: str, module_names: set[str]) -> str | None:
    """The module of ``model`` a checkpoint path names, allowing a wrapper prefix on either side."""
    if ckpt_path in module_names:
        return ckpt_path
    parts = ckpt_path.split(".")
    for i in range(1, len(parts)):  # checkpoint trained on a wrapper: drop its leading names
        if ".".join(parts[i:]) in module_names:
            return ".".join(parts[i:])
    hits = [m for m in module_names if m.endswith("." + ckpt_path)]  # model is the wrapper
    return hits[0] if len(hits) == 1 else None


def _plugin(cfg: dict):

    ptype = cfg.get("peft_type")
    for m in registered():
        if m.peft_type is not None and m.peft_type == ptype:
            return m
    known = sorted(m.peft_type for m in registered() if m.peft_type)
    raise CheckpointError(f"PEFT adapter type {ptype!r} is not supported by the importer (supported: "
                          f"{', '.join(known)})")


def read_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
              ignore_modules_to_save: bool = False, allow_pickle: bool = False):
    """``(spec, fill(adapted), modules_to_save)`` for the PEFT checkpoint in ``directory`` applied to ``model``.

    ``modules_to_save`` (whole modules PEFT trained, e.g. a classifier) are imported as
    ``Spec.modules_to_save`` unless ``ignore_modules_to_save=True`` (then their tensors are skipped).

    A pickled ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then read with
    ``weights_only=True``)."""

    d = Path(directory)
    cfg, weights = _read(d, allow_pickle=allow_pickle)
    method = _plugin(cfg)
    try:  # options the method cannot express are named before any key is judged
        method.peft_spec(cfg, ("q",))
    except (SpecError, NotImplementedError, KeyError, TypeError, ValueError):
        pass
    custom = method.peft_read(model, cfg, weights, name, d)
    if custom is not None:
        return (*custom, ())
    saved_modules = _present(model, _modules_to_save(cfg), weights)
    module_names = {n for n, _ in model.named_modules() if n}
    mapped: dict[str, tuple[str, str]] = {}      # checkpoint key → (module path, our tensor name)
    whole: dict[str, str] = {}                   # checkpoint key → our key (modules_to_save)
    unresolved = []
    for key in weights:
        hit = method.peft_key(key)
        if hit is None:
            path = _whole_module_key(key, saved_modules)
            if path is not None:
                if not ignore_modules_to_save:
                    mod, _, leaf = path.rpartition(".")
                    ours = _resolve(mod, module_names)
                    if ours is None:
                        unresolved.append(mod)
                    else:
                        whole[key] = f"{ours}.{leaf}"
                continue
            raise CheckpointError(f"unexpected key {key!r} in {d}; is this a {method.peft_type} checkpoint?")
        # an empty path: a tensor of the adapter itself, not of a module of the model (a soft prompt)
        path = _resolve(hit[0], module_names) if hit[0] else ""
        if path is None:
            unresolved.append(hit[0])
            continue
        mapped[key] = (path, hit[1])
    if unresolved:
        raise CheckpointError(f"{len(set(unresolved))} adapted module(s) of the checkpoint do not exist in "
                              f"{type(model).__name__}, e.g. {sorted(set(unresolved))[:3]}; was it trained on "
                              "another architecture?")
    if not mapped:
        raise CheckpointError(f"no {method.peft_type} tensors in {d}")
    targets = tuple(sorted({p for p, _ in mapped.values() if p}))
    spec = method.peft_spec(cfg, targets)

    def fill(adapted) -> None:
        params = dict(adapted.named_parameters())
        filled = set()
        pairs = [(key, f"{adapter_prefix(name)}{path}.{kind}" if path else f"{adapter_prefix(name)}{kind}", "")
                 for key, (path, kind) in mapped.items()]
        pairs += [(key, ours, " (modules_to_save)") for key, ours in whole.items()]
        with torch.no_grad():
            for key, ours, what in pairs:
                if ours not in params:
                    raise CheckpointError(f"{key}{what} has no counterpart {ours} in the adapted model")
                p, v = params[ours], weights[key]
                check_tensor(key, v, p, d)
                p.copy_(v.to(p.dtype))
                filled.add(ours)
        heads = set(trainable_module_keys(adapted))   # one state_dict() walk, not one per parameter
        empty = sorted(n for n in params if (n.startswith(adapter_prefix(name)) or n in heads) and n not in filled)
        if empty:
            raise CheckpointError(f"the checkpoint has no values for {empty[:3]} ({len(empty)} in all)")

    return spec, fill, (() if ignore_modules_to_save else tuple(saved_modules))


def _modules_to_save(cfg: dict) -> list[str]:
    names = cfg.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"adapter_config.json: modules_to_save must be a list of module names, got {names!r}")
    return names


def _present(model: nn.Module, names: list[str], weights: dict) -> list[str]:
    """The ``modules_to_save`` names ``model`` has, or that the checkpoint holds tensors for. PEFT's task
    types write default lists (``SEQ_CLS``: classifier, score, pre_classifier) and skip the names a
    model lacks; so does the importer (a saved tensor of a missing module is still an error)."""
    from .trainable import resolve_modules_to_save

    return [n for n in names if resolve_modules_to_save(model, [n], strict=False)
            or any(_whole_module_key(k, [n]) is not None for k in weights)]


def _whole_module_key(key: str, names: list[str]) -> str | None:
    """``<module path>.<tensor>`` of a ``modules_to_save`` tensor key (PEFT writes ``base_model.model.<path>``,
    older versions with ``.modules_to_save.<adapter>`` inside), or None when no listed module owns it."""
    k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    k = re.sub(r"\.modules_to_save\.[A-Za-z_]\w*\.", ".", k)
    mod = "." + k.rpartition(".")[0] + "."
    return k if any(f".{n}." in mod for n in names) else None


__all__ = ["read_peft"]
