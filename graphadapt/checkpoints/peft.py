"""Import a PEFT LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``).

before: a directory written by ``peft_model.save_pretrained(dir)`` for a LoRA/rsLoRA/DoRA adapter
after:  ``graphadapt.apply(model, LoRA(...))`` with PEFT's weights in place — the same outputs.

The adapted module paths are read from the checkpoint's keys (not re-derived from
``target_modules``), so what PEFT adapted is exactly what graphadapt adapts, even when the
checkpoint was trained on a wrapper of ``model`` (``bert.encoder…`` vs ``encoder…``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)"
                  r"(?:\.(?P<adapter>[A-Za-z_][\w]*))?(?:\.weight)?$")
_OURS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


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


def peft_lora_spec(cfg: dict, targets: tuple[str, ...]):
    """The graphadapt :class:`LoRA` equivalent to a PEFT ``LoraConfig`` dict (for given module paths)."""
    from ..spec import LoRA

    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"PEFT adapter type {cfg.get('peft_type')!r} is not supported by the importer "
                              "(only LORA, with rsLoRA/DoRA)")
    # options that change what the adapter computes: importing without them would give wrong numbers
    unsupported = {k: cfg.get(k) for k in ("rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
                                            "trainable_token_indices", "megatron_config", "use_qalora",
                                            "alora_invocation_tokens") if cfg.get(k)}
    if cfg.get("bias", "none") not in ("none", None):
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise CheckpointError(f"PEFT options not supported by the importer yet: {unsupported}; re-train "
                              "without them or merge the adapter with PEFT (merge_and_unload) instead.")
    missing = [k for k in ("r", "lora_alpha") if k not in cfg]
    if missing:
        raise CheckpointError(f"adapter_config.json lacks {missing}; is it a PEFT LoraConfig?")
    try:
        r, _ = int(cfg["r"]), float(cfg["lora_alpha"])
        dropout = float(cfg.get("lora_dropout") or 0.0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter_config.json: r/lora_alpha/lora_dropout must be numbers ({e})") from e
    return LoRA(r=r, alpha=cfg["lora_alpha"], dropout=dropout, targets=targets,
                use_rslora=bool(cfg.get("use_rslora")), use_dora=bool(cfg.get("use_dora")))


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                ignore_modules_to_save: bool = False, allow_pickle: bool = False, **apply_kwargs):
    """Apply the LoRA adapter saved in a PEFT checkpoint directory to ``model``; returns an AdaptedModel.

    ``modules_to_save`` (fully trained copies of e.g. a classifier head) are not adapters; they
    raise :class:`CheckpointError` unless ``ignore_modules_to_save=True``. A pickled
    ``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then read with ``weights_only=True``).
    """
    from ..api import apply
    from ..spec import Spec
    from . import check_tensor

    d = Path(directory)
    cfg, weights = _read(d, allow_pickle=allow_pickle)
    peft_lora_spec(cfg, ("q",))  # unsupported options are named before any key is judged
    if cfg.get("modules_to_save") and not ignore_modules_to_save:
        raise CheckpointError(
            f"the checkpoint also trains whole modules {cfg['modules_to_save']} (modules_to_save); graphadapt "
            "imports the LoRA adapter only. Load those weights into the base model first, then pass "
            "ignore_modules_to_save=True.")
    module_names = {n for n, _ in model.named_modules() if n}
    mapped: dict[str, tuple[str, str]] = {}      # checkpoint key → (module path, our tensor name)
    unresolved = []
    for key in weights:
        m = _KEY.match(key)
        if m is None:
            if ".modules_to_save." in key or "modules_to_save" in key:
                continue
            raise CheckpointError(f"unexpected key {key!r} in {d}; is this a LoRA checkpoint?")
        path = _resolve(m["path"], module_names)
        if path is None:
            unresolved.append(m["path"])
            continue
        mapped[key] = (path, _OURS[m["kind"]])
    if unresolved:
        raise CheckpointError(f"{len(set(unresolved))} adapted module(s) of the checkpoint do not exist in "
                              f"{type(model).__name__}, e.g. {sorted(set(unresolved))[:3]}; was it trained on "
                              "another architecture?")
    if not mapped:
        raise CheckpointError(f"no LoRA tensors in {d}")
    targets = tuple(sorted({p for p, _ in mapped.values()}))
    adapted = apply(model, Spec({name: peft_lora_spec(cfg, targets)}), **apply_kwargs)
    params = dict(adapted.named_parameters())
    filled = set()
    with torch.no_grad():
        for key, (path, kind) in mapped.items():
            ours = f"adapters.{name}.{path}.{kind}"
            if ours not in params:
                raise CheckpointError(f"{key} has no counterpart {ours} in the adapted model")
            p, v = params[ours], weights[key]
            check_tensor(key, v, p, d)
            p.copy_(v.to(p.dtype))
            filled.add(ours)
    empty = sorted(n for n in params if n.startswith(f"adapters.{name}.") and n not in filled)
    if empty:
        raise CheckpointError(f"the checkpoint has no values for {empty[:3]} ({len(empty)} in all)")
    return adapted
