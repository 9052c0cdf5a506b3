"""Adapter specs: frozen, validated, hashable dataclasses with JSON/YAML round trip.

    from graphadapt.spec import LoRA, SeqBn, Spec
    spec = Spec({"task": LoRA(r=8, alpha=16, targets=("q", "v"))})
    Spec.from_yaml(spec.to_yaml()) == spec
"""

from __future__ import annotations

from ._frozen import FrozenMapping
from .base import MethodSpec, register_method, registered_methods, registered_presets
from .bottleneck import (
    ACTIVATIONS,
    BN_INITS,
    PRESETS,
    AdapterPlus,
    Bottleneck,
    Compacter,
    CompacterPlusPlus,
    DoubleSeqBn,
    ParBn,
    SeqBn,
    adapterhub_config_dict,
)
from .ia3 import IA3
from .lora import ALL_LINEAR, LORA_INITS, ROLES, LoRA, selector_matches, target_kind
from .spec import FORMAT_VERSION, Spec, as_spec

__all__ = [
    "ACTIVATIONS",
    "ALL_LINEAR",
    "AdapterPlus",
    "BN_INITS",
    "Bottleneck",
    "Compacter",
    "CompacterPlusPlus",
    "DoubleSeqBn",
    "FORMAT_VERSION",
    "FrozenMapping",
    "IA3",
    "LORA_INITS",
    "LoRA",
    "MethodSpec",
    "PRESETS",
    "ParBn",
    "ROLES",
    "SeqBn",
    "Spec",
    "adapterhub_config_dict",
    "as_spec",
    "register_method",
    "registered_methods",
    "registered_presets",
    "selector_matches",
    "target_kind",
]
