"""PEFT DeLoRA checkpoints → graphadapt DeLoRA: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.{delora_A,delora_B,delora_lambda,delora_w_norm}[.<adapter>]``;
ours ``adapters.<name>.<module path>.<same name>`` (same shapes).
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import DeLoRA

peft_key = peft_key_reader({n: n for n in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")})


def peft_delora_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> DeLoRA:
    refuse_peft_options("DeLoRA", {k: v for k, v in cfg.items() if k not in ("rank_pattern", "lambda_pattern")})
    try:
        return DeLoRA(r=int(cfg.get("r", 8)), delora_lambda=float(cfg.get("delora_lambda", 15)),
                      rank_pattern=dict(cfg.get("rank_pattern") or {}),
                      lambda_pattern=dict(cfg.get("lambda_pattern") or {}),
                      dropout=float(cfg.get("module_dropout") or 0.0), targets=targets)
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT DeloraConfig does not translate to a graphadapt DeLoRA: {e}") from e


__all__ = ["peft_delora_spec", "peft_key"]
