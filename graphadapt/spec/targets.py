"""Where a linear-site method goes: the ``targets`` vocabulary shared by LoRA, IA3 and any
method that adapts linear layers.

A target is a structural role found in the graph (``q k v o up gate down``), ``"all-linear"``
(every role), or a module-path selector: a glob (``'*.attention.self.query'``), a regex
written ``'re:<pattern>'`` (full match) or a dotted module path. :class:`LinearTargets` is the
mixin a method spec uses to get ``targets``/``layers``/``leave_out`` semantics that the
generic site selection (:func:`graphadapt.passes.select.select_linear_sites`) reads.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from graphadapt.errors import SpecError
from graphadapt.vocab import ALL_LINEAR, ROLES

_GLOB_CHARS = frozenset("*?[")
TARGET_HELP = (
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
        raise SpecError(f"targets must be non-empty strings: {TARGET_HELP}; got {target!r}", field="targets")
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
        f"targets: {target!r} is not a role. Use one of {TARGET_HELP}. "
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


def normalise_targets(targets: Any) -> tuple[str, ...]:
    """Validate ``targets`` (a string or a list of them) into a tuple without repeats."""
    if isinstance(targets, str):
        targets = (targets,)  # LoRA(targets="q") is too natural to reject
    elif isinstance(targets, Mapping) or not isinstance(targets, Iterable):
        raise SpecError(f"targets must be a list of strings: {TARGET_HELP}; got {targets!r}", field="targets")
    out: list[str] = []
    for t in targets:
        target_kind(t)
        if t not in out:  # a repeated target would insert the same branch twice
            out.append(t)
    if not out:
        raise SpecError(f"targets must not be empty: give {TARGET_HELP}", field="targets")
    return tuple(out)


class LinearTargets:
    """Mixin for method specs with a ``targets`` field (what linear-site selection reads)."""

    def role_targets(self) -> tuple[str, ...]:
        """The structural roles targeted (``"all-linear"`` expanded), in canonical role order."""
        return expand_roles(self.targets)  # type: ignore[attr-defined]

    def path_targets(self) -> tuple[str, ...]:
        """The module-path selectors (globs, ``re:`` regexes, dotted paths), as given."""
        return tuple(t for t in self.targets if t != ALL_LINEAR and t not in ROLES)  # type: ignore[attr-defined]

    def selects_path(self, module_path: str) -> bool:
        """Whether any path selector picks ``module_path`` (roles are matched by the planner)."""
        return any(selector_matches(s, module_path) for s in self.path_targets())


__all__ = ["ALL_LINEAR", "LinearTargets", "ROLES", "TARGET_HELP", "expand_roles", "normalise_targets",
           "selector_matches", "target_kind"]
