"""PEFT IA3 checkpoints ↔ graphadapt IA3: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.ia3_l[.<adapter>]``; ours:
``adapters.<name>.<module path>.ia3_l`` (same shape: [out, 1], or [1, in] for feedforward modules).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from graphadapt.errors import CheckpointError

from .spec import IA3

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.ia3_l(?:\.(?P<adapter>[A-Za-z_][\w]*))?$")


def peft_key(key: str) -> tuple[str, str] | None:
    m = _KEY.match(key)
    return None if m is None else (m["path"], "ia3_l")


def _is_feedforward(path: str, feedforward: Any) -> bool:
    """PEFT's rule: a regex string must fullmatch the module path; a list entry must end it."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(f) for f in feedforward)


def peft_ia3_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> IA3:
    """The graphadapt :class:`IA3` equivalent to a PEFT ``IA3Config`` dict (for given module paths)."""
    if cfg.get("fan_in_fan_out") is not None and not isinstance(cfg.get("fan_in_fan_out"), bool):
        raise CheckpointError(f"PEFT IA3 fan_in_fan_out must be a bool, got {cfg['fan_in_fan_out']!r}")
    feedforward = tuple(t for t in targets if _is_feedforward(t, cfg.get("feedforward_modules")))
    return IA3(targets=targets, feedforward=feedforward,
               init_ia3_weights=bool(cfg.get("init_ia3_weights", True)))


__all__ = ["peft_ia3_spec", "peft_key"]
