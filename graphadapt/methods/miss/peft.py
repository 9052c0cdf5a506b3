"""PEFT MiSS checkpoints → graphadapt MiSS: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.miss_block[.<adapter>]``; ours ``adapters.<name>.<path>.miss_block``
(same shape: [r, out], [r, mini_r] or [out/r, r, r]).
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import MiSS

peft_key = peft_key_reader({"miss_block": "miss_block"})


def peft_miss_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> MiSS:
    refuse_peft_options("MiSS", cfg)
    try:
        return MiSS(r=int(cfg.get("r", 64)), mini_r=int(cfg.get("mini_r", 1)),
                    dropout=float(cfg.get("miss_dropout") or 0.0), init_weights=cfg.get("init_weights", True),
                    targets=targets)
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT MissConfig does not translate to a graphadapt MiSS: {e}") from e


__all__ = ["peft_key", "peft_miss_spec"]
