"""LoRA spec: ``y = W x + b  →  y = W x + b + scaling · B(A(dropout(x)))``.

Where it goes is said with ``targets``: structural roles found in the graph
(``q k v o up gate down``, or ``"all-linear"``) and/or module-path selectors
(glob, ``re:<regex>``, or dotted path), so one spec serves every architecture.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphadapt.errors import SpecError

from .base import (
    MethodSpec,
    check_bool,
    check_choice,
    check_int,
    check_layer_indices,
    check_real,
    is_real,
    register_method,
    spec_field,
)

# Kept here rather than imported from graphadapt.structure: spec is the top layer.
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down")
ALL_LINEAR = "all-linear"
LORA_INITS: tuple[str, ...] = ("lora", "gaussian", "bert", "pissa")

_GLOB_CHARS = frozenset("*?[")
_TARGET_HELP = (
    f"roles {', '.join(ROLES)}, {ALL_LINEAR!r} (every role), or a module-path selector: "
    "a glob such as '*.attention.self.query' (contains *, ? or [), a regex written "
    "'re:<pattern>' (full match), or a dotted module path such as 'encoder.layer.0.attention.self.query'"
)


def target_kind(target: str) -> str:
    """Classify a target: ``"role"``, ``"all-linear"``, ``"regex"``, ``"glob"`` or ``"path"``.

    Raises :class:`SpecError` (field ``targets``) for a bare word that is not a role
    and for a regex that does not compile.
    """
    if not isinstance(target, str) or not target:
        raise SpecError(f"targets must be non-empty strings: {_TARGET_HELP}; got {target!r}", field="targets")
    if target in ROLES:
        return "role"
    if target == ALL_LINEAR:
        return ALL_LINEAR
    if target.startswith("re:"):
        try:
            re.compile(target[3:])
        except re.error as e:
            raise SpecError(f"targets: regex {target!r} does not compile ({e})", field="targets") from e
        return "regex"
    if _GLOB_CHARS & set(target):
        return "glob"
    if "." in target:
        return "path"
    raise SpecError(
        f"targets: {target!r} is not a role. Use one of {_TARGET_HELP}. "
        f"To select modules by name use e.g. '*.{target}' or 're:.*{re.escape(target)}'",
        field="targets",
    )


def expand_roles(targets) -> tuple[str, ...]:
    """The roles among ``targets`` (``"all-linear"`` expanded; path selectors ignored), in role order."""
    wanted = set()
    for t in targets:
        if t == ALL_LINEAR:
            wanted.update(ROLES)
        elif t in ROLES:
            wanted.add(t)
    return tuple(r for r in ROLES if r in wanted)


def selector_matches(selector: str, module_path: str) -> bool:
    """Whether a module-path selector picks ``module_path``.

    Globs match the whole path (``fnmatchcase``), regexes must ``fullmatch`` (as
    PEFT does for a string ``target_modules``), and a dotted path matches itself
    or any path ending in ``"." + selector`` so a prefix-free path still works
    after wrapping the model.
    """
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], module_path) is not None
    if _GLOB_CHARS & set(selector):
        # '*.fc1' also selects a top-level 'fc1' (the error for a bare word suggests that form)
        return fnmatch.fnmatchcase(module_path, selector) or (
            selector.startswith("*.") and fnmatch.fnmatchcase("." + module_path, selector))
    return module_path == selector or module_path.endswith("." + selector)


@register_method
@dataclass(frozen=True)
class LoRA(MethodSpec):
    """Low-rank adaptation (Hu et al., 2021), with rsLoRA, DoRA and gating options."""

    method: ClassVar[str] = "lora"

    r: int = spec_field(8, help="Rank of the update B·A (int > 0).")
    alpha: float = spec_field(8, help="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = spec_field(0.0, help="Dropout on the LoRA branch input, in [0, 1).")
    targets: tuple[str, ...] = spec_field(("q", "v"), help="Where to insert LoRA: " + _TARGET_HELP + ".")
    layers: tuple[int, ...] | None = spec_field(None, help="Layer indices to adapt (0-based); None means every layer.")
    leave_out: tuple[int, ...] = spec_field((), help="Layer indices (0-based) never adapted, even if listed in layers.")
    use_rslora: bool = spec_field(False, help="Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023).")
    use_dora: bool = spec_field(False, help="Weight-decomposed LoRA (DoRA, Liu et al., 2024): learn a magnitude vector too.")
    init: str = spec_field(
        "lora",
        help="Initialisation: 'lora' (Kaiming-uniform A, zero B), 'gaussian' (normal A with std 1/r, zero B), "
        "'bert' (normal std 0.02 for A and B, so the output changes at init), "
        "'pissa' (A, B from the top-r SVD of W, residual left in W).",
    )
    use_gating: bool = spec_field(False, help="Add a learned sigmoid gate on the branch (UniPELT-style).")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("r", check_int("r", self.r, minimum=1))
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SpecError(f"alpha must be a number > 0 (int or float), got {self.alpha!r}", field="alpha")
        set_("dropout", check_real("dropout", self.dropout, 0.0, 1.0))
        set_("targets", _normalise_targets(self.targets))
        set_("layers", check_layer_indices("layers", self.layers, allow_none=True))
        set_("leave_out", check_layer_indices("leave_out", self.leave_out, allow_none=False))
        set_("use_rslora", check_bool("use_rslora", self.use_rslora))
        set_("use_dora", check_bool("use_dora", self.use_dora))
        set_("use_gating", check_bool("use_gating", self.use_gating))
        check_choice("init", self.init, LORA_INITS)
        if self.use_dora and self.use_gating:
            raise SpecError(
                "use_dora and use_gating cannot both be True: DoRA rescales the merged weight column-wise, "
                "so a gate on the low-rank branch alone would no longer gate the update (and it could not be merged)",
                field="use_gating",
            )

    @property
    def scaling(self) -> float:
        """Factor applied to ``B(A(x))``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def role_targets(self) -> tuple[str, ...]:
        """The structural roles targeted (``"all-linear"`` expanded), in canonical role order."""
        return expand_roles(self.targets)

    def path_targets(self) -> tuple[str, ...]:
        """The module-path selectors (globs, ``re:`` regexes, dotted paths), as given."""
        return tuple(t for t in self.targets if t != ALL_LINEAR and t not in ROLES)

    def selects_path(self, module_path: str) -> bool:
        """Whether any path selector picks ``module_path`` (roles are matched by the planner)."""
        return any(selector_matches(s, module_path) for s in self.path_targets())


def _normalise_targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)  # LoRA(targets="q") is too natural to reject
    elif isinstance(targets, Mapping) or not isinstance(targets, Iterable):
        raise SpecError(f"targets must be a list of strings: {_TARGET_HELP}; got {targets!r}", field="targets")
    out: list[str] = []
    for t in targets:
        target_kind(t)
        if t not in out:  # a repeated target would insert the same branch twice
            out.append(t)
    if not out:
        raise SpecError(f"targets must not be empty: give {_TARGET_HELP}", field="targets")
    return tuple(out)


__all__ = ["ALL_LINEAR", "LORA_INITS", "LoRA", "ROLES", "selector_matches", "target_kind"]
