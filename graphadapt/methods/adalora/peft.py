"""PEFT AdaLoRA checkpoints → graphadapt AdaLoRA: keys ``<path>.lora_{A,E,B}`` (``ranknum`` is not saved), config
``AdaLoraConfig`` (``init_r``, ``target_r``, ``lora_alpha``, the schedule and the saved ``rank_pattern``)."""

from __future__ import annotations

import re
from typing import Any, Mapping

from graphadapt.errors import CheckpointError

from .spec import AdaLoRA

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_E|lora_B)"
                  r"(?:\.(?!weight$)(?P<adapter>[A-Za-z_][\w]*))?(?:\.weight)?$")


_OURS = {"lora_A": "svd_A", "lora_E": "svd_E", "lora_B": "svd_B"}


def peft_key(key: str) -> tuple[str, str] | None:
    m = _KEY.match(key)
    return None if m is None else (m["path"], _OURS[m["kind"]])


def peft_adalora_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> AdaLoRA:
    unsupported = {k: cfg.get(k) for k in ("use_dora", "lora_bias", "layer_replication", "rank_pattern_unused")
                   if cfg.get(k)}
    if cfg.get("bias", "none") not in ("none", None):
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise CheckpointError(f"PEFT AdaLoRA options not supported by the importer: {unsupported}")
    pattern = {re.sub(r"^base_model\.model\.", "", k): v for k, v in (cfg.get("rank_pattern") or {}).items()}
    try:
        return AdaLoRA(init_r=int(cfg.get("init_r", 12)), target_r=int(cfg.get("target_r", 8)),
                       alpha=cfg.get("lora_alpha", 8), dropout=float(cfg.get("lora_dropout") or 0.0),
                       targets=targets, tinit=int(cfg.get("tinit", 0)), tfinal=int(cfg.get("tfinal", 0)),
                       deltaT=int(cfg.get("deltaT", 1)), beta1=cfg.get("beta1", 0.85), beta2=cfg.get("beta2", 0.85),
                       orth_reg_weight=cfg.get("orth_reg_weight", 0.5), total_step=cfg.get("total_step"),
                       rank_pattern=pattern)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter_config.json: not a valid AdaLoraConfig ({e})") from e


__all__ = ["peft_adalora_spec", "peft_key"]
