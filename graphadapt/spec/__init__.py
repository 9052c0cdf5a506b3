"""Spec core: frozen, validated method specs, the spec registry, ``Spec`` with JSON/YAML round trip,
and the target vocabulary of linear-site methods.

Method specs themselves (``LoRA``, ``IA3``, ``SeqBn`` …) live in their method folders
(``graphadapt.methods.<m>``) and are re-exported by ``graphadapt``::

    import graphadapt as ga
    spec = ga.Spec({"task": ga.LoRA(r=8, alpha=16, targets=("q", "v"))})
    ga.Spec.from_yaml(spec.to_yaml()) == spec
"""

from __future__ import annotations

from ._frozen import FrozenMapping
from .base import MethodSpec, register_method, registered_methods, registered_presets
from .composition import Average, BatchSplit, Block, Fuse, MultiTask, Parallel, Route, Split, Stack
from .spec import FORMAT_VERSION, Spec, as_spec
from .targets import ALL_LINEAR, ROLES, TARGET_HELP, LinearTargets, expand_roles, selector_matches, target_kind

__all__ = [
    "ALL_LINEAR",
    "Average",
    "BatchSplit",
    "Split",
    "Block",
    "Fuse",
    "Parallel",
    "Route",
    "MultiTask",
    "Stack",
    "FORMAT_VERSION",
    "FrozenMapping",
    "LinearTargets",
    "MethodSpec",
    "ROLES",
    "Spec",
    "TARGET_HELP",
    "as_spec",
    "expand_roles",
    "register_method",
    "registered_methods",
    "registered_presets",
    "selector_matches",
    "target_kind",
]
