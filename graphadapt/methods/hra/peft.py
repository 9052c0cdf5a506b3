"""PEFT HRA checkpoints → graphadapt HRA: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.hra_u[.<adapter>]`` [in, r]; ours ``adapters.<name>.<path>.hra_u``.
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import HRA

peft_key = peft_key_reader({"hra_u": "hra_u"})


def peft_hra_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> HRA:
    refuse_peft_options("HRA", cfg)
    try:
        return HRA(r=int(cfg.get("r", 8)), apply_GS=bool(cfg.get("apply_GS")), targets=targets)
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT HRAConfig does not translate to a graphadapt HRA: {e}") from e


__all__ = ["peft_hra_spec", "peft_key"]
