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
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..vocab import adapter_prefix


def _read(directory: Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    from . import read_json, read_tensors

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
    from ..methods import registered

    ptype = cfg.get("peft_type")
    for m in registered():
        if m.peft_type is not None and m.peft_type == ptype:
            return m
    known = sorted(m.peft_type for m in registered() if m.peft_type)
    raise CheckpointError(f"PEFT adapter type {ptype!r} is not supported by the importer (supported: "
                          f"{', '.join(known)})")


def read_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
              ignore_modules_to_save: bool = False, allow_pickle: bool = False):
    """``(spec, fill(adapted))`` for the PEFT checkpoint in ``directory`` applied to ``model``.

    A pickled ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then read with
    ``weights_only=True``)."""
    from ..errors import SpecError
    from . import check_tensor

    d = Path(directory)
    cfg, weights = _read(d, allow_pickle=allow_pickle)
    method = _plugin(cfg)
    try:  # options the method cannot express are named before any key is judged
        method.peft_spec(cfg, ("q",))
    except (SpecError, NotImplementedError, KeyError, TypeError, ValueError):
        pass
    custom = method.peft_read(model, cfg, weights, name, d)
    if custom is not None:
        return custom
    if cfg.get("modules_to_save") and not ignore_modules_to_save:
        raise CheckpointError(
            f"the checkpoint also trains whole modules {cfg['modules_to_save']} (modules_to_save); graphadapt "
            "imports the adapter only. Load those weights into the base model first, then pass "
            "ignore_modules_to_save=True.")
    module_names = {n for n, _ in model.named_modules() if n}
    mapped: dict[str, tuple[str, str]] = {}      # checkpoint key → (module path, our tensor name)
    unresolved = []
    for key in weights:
        hit = method.peft_key(key)
        if hit is None:
            if "modules_to_save" in key:
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
        with torch.no_grad():
            for key, (path, kind) in mapped.items():
                ours = f"{adapter_prefix(name)}{path}.{kind}" if path else f"{adapter_prefix(name)}{kind}"
                if ours not in params:
                    raise CheckpointError(f"{key} has no counterpart {ours} in the adapted model")
                p, v = params[ours], weights[key]
                check_tensor(key, v, p, d)
                p.copy_(v.to(p.dtype))
                filled.add(ours)
        empty = sorted(n for n in params if n.startswith(adapter_prefix(name)) and n not in filled)
        if empty:
            raise CheckpointError(f"the checkpoint has no values for {empty[:3]} ({len(empty)} in all)")

    return spec, fill


__all__ = ["read_peft"]
