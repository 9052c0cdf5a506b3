"""Per-site overrides of one spec number (PEFT's ``rank_pattern``, ``alpha_pattern``, ``n_frequency_pattern``; not a
method): validation for a spec field, and PEFT's lookup rule.

PEFT's LoRA/LyCORIS rule (``get_pattern_key``): the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``;
FourierFT's own: the first ``k`` with ``re.match(rf".*\\.{k}$", path)`` (a dot before the key is required).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Iterable

from graphadapt.errors import SpecError
from graphadapt.spec._frozen import FrozenMapping
from graphadapt.spec.base import check_int, is_real

PEFT_RULE = r"(.*\.)?({key})$"
FOURIERFT_RULE = r".*\.{key}$"


def check_pattern(name: str, value: Any, integer: bool) -> FrozenMapping:
    """``{regex: number}`` (ints >= 1 or reals > 0) as a FrozenMapping; a SpecError naming ``name`` otherwise."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{name} must be a mapping {{regex: value}}, got {value!r}", field=name)
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"{name} keys must be non-empty regex strings, got {key!r}", field=name)
        try:
            re.compile(key)
        except re.error as e:
            raise SpecError(f"{name} key {key!r} is not a valid regex ({e})", field=name) from e
        if integer:
            out[key] = check_int(f"{name}[{key!r}]", v, minimum=1)
        elif not is_real(v) or not math.isfinite(v) or v <= 0:
            raise SpecError(f"{name}[{key!r}] must be a number > 0, got {v!r}", field=name)
        else:
            out[key] = v
    return FrozenMapping(out)


def pick(pattern: Mapping[str, Any], names: Iterable[str], default: Any, rule: str = PEFT_RULE) -> Any:
    """The value of the first key of ``pattern`` matching one of a site's ``names`` (its site name, its module
    path) under ``rule``; ``default`` when none does."""
    names = [n for n in names if n]
    for key, value in pattern.items():
        if any(re.match(rule.format(key=key), n) for n in names):
            return value
    return default


__all__ = ["FOURIERFT_RULE", "PEFT_RULE", "check_pattern", "pick"]
