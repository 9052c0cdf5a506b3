"""PEFT IA3 checkpoints ↔ graphadapt IA3: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.ia3_l[.<adapter>]``; ours:
``adapters.<name>.<module path>.ia3_l`` (same shape: [out, 1], or [1, in] for feedforward modules).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from graphadapt.errors import CheckpointError

from ..sliced import peft_inexpressible_sites

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


def peft_ia3_export(spec: IA3, modules: Mapping[str, Any], records: list) -> tuple[dict, dict]:
    """PEFT ``IA3Config`` fields and ``{<path>.ia3_l: …}`` for a graphadapt IA3 adapter."""
    refused = {k: v for k, v in (("use_gating", spec.use_gating), ("alpha", spec.alpha if spec.alpha != 1 else 0)) if v}
    refused.update(peft_inexpressible_sites(modules, records))
    if refused:
        raise CheckpointError(f"PEFT's IA3 cannot express {refused} (AdapterHub's alpha/gating, or sites that are "
                              "not whole nn.Linear layers); save with save_adapters instead")
    cfg = {"peft_type": "IA3", "target_modules": sorted(modules),
           "feedforward_modules": sorted(p for p, m in modules.items() if m.feedforward),
           "fan_in_fan_out": False, "init_ia3_weights": True}
    return cfg, {f"{path}.ia3_l": m.ia3_l for path, m in modules.items()}


__all__ = ["peft_ia3_export", "peft_ia3_spec", "peft_key"]
