"""PEFT RoAd checkpoints → graphadapt RoAd: config translation and tensor names.

PEFT keys: ``[base_model.model.]<module path>.{road_theta,road_alpha}[.<adapter>]``; ours
``adapters.<name>.<module path>.<same name>`` (same shapes).
"""

from __future__ import annotations

from typing import Any, Mapping

from graphadapt.errors import CheckpointError, SpecError

from ..transforms import peft_key_reader, refuse_peft_options
from .spec import RoAd

peft_key = peft_key_reader({"road_theta": "road_theta", "road_alpha": "road_alpha"})


def peft_road_spec(cfg: Mapping[str, Any], targets: tuple[str, ...]) -> RoAd:
    refuse_peft_options("RoAd", cfg)
    try:
        return RoAd(variant=str(cfg.get("variant", "road_1")), group_size=int(cfg.get("group_size", 64)),
                    targets=targets)
    except (SpecError, TypeError, ValueError) as e:
        raise CheckpointError(f"PEFT RoadConfig does not translate to a graphadapt RoAd: {e}") from e


__all__ = ["peft_key", "peft_road_spec"]
