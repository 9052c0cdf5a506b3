"""PEFT LoRA checkpoints ↔ graphadapt LoRA: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.{lora_A,lora_B,lora_magnitude_vector}[.<adapter>][.weight]``;
ours: ``adapters.<name>.<module path>.{lora_A,lora_B,lora_magnitude}`` (same shapes).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from graphadapt.errors import CheckpointError

from .spec import LoRA

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)"
                  r"(?:\.(?P<adapter>[A-Za-z_][\w]*))?(?:\.weight)?$")
_OURS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


def peft_key(key: str) -> tuple[str, str] | None:
    m = _KEY.match(key)
    return None if m is None else (m["path"], _OURS[m["kind"]])


def peft_lora_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> LoRA:
    """The graphadapt :class:`LoRA` equivalent to a PEFT ``LoraConfig`` dict (for given module paths)."""
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


def peft_lora_export(spec: LoRA, modules: Mapping[str, Any], records: list) -> tuple[dict, dict]:
    """PEFT ``LoraConfig`` fields and ``{<path>.lora_A.weight: …}`` for a graphadapt LoRA adapter."""
    refused = {k: v for k, v in (("use_gating", spec.use_gating), ("init", spec.init == "pissa")) if v}
    for r in records:
        if r.get("layout") != "linear" or "out_slice" in r.details:
            refused[r.site] = f"a {r.get('layout')} site{' slice' if 'out_slice' in r.details else ''}"
    if refused:
        raise CheckpointError(f"PEFT's LoRA cannot express {refused} (gating, PiSSA's changed base weights, or "
                              "sites that are not whole nn.Linear layers); save with save_adapters instead")
    cfg = {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
           "target_modules": sorted(modules), "use_rslora": spec.use_rslora, "use_dora": spec.use_dora,
           "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}
    tensors = {}
    for path, m in modules.items():
        tensors[f"{path}.lora_A.weight"] = m.lora_A
        tensors[f"{path}.lora_B.weight"] = m.lora_B
        if spec.use_dora:
            tensors[f"{path}.lora_magnitude_vector"] = m.lora_magnitude
    return cfg, tensors


__all__ = ["peft_key", "peft_lora_export", "peft_lora_spec"]
