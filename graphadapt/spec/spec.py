"""``Spec``: named method specs applied together, with JSON/YAML round trip.

File format (JSON or YAML, same structure)::

    version: 1
    seed: 0
    active: [task]          # or null: every adapter
    adapters:
      task: {method: lora, r: 8, alpha: 16, targets: [q, v]}
    modules_to_save: [classifier]   # optional: base modules trained whole (docs/lifecycle.md)
    task_type: SEQ_CLS              # optional: PEFT's task type; its head is trained whole
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from graphadapt.errors import SpecError
from graphadapt.replication import check_layer_map

from ._frozen import FrozenMapping
from .base import MethodSpec, check_seed, spec_field
from .composition import BLOCKS, Block, Fuse, block_from_dict

FORMAT_VERSION = 1
_JSON_SUFFIXES = (".json",)
_YAML_SUFFIXES = (".yaml", ".yml")


def unique_keys(pairs: list) -> dict:
    """``json.loads(object_pairs_hook=...)``: a key given twice in one object is an error, not "the last wins"
    (a spec with adapter ``"a"`` twice would silently keep only the second)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise SpecError(f"JSON object has the key {k!r} twice (the first value would be silently dropped); "
                            "keep one, or rename the second")
        out[k] = v
    return out


def _module_attributes() -> frozenset[str]:
    """Names an ``nn.Module`` already uses (``training``, ``forward``, ``_parameters`` ...)."""
    return frozenset(dir(nn.Module())) | frozenset(vars(nn.Module()))


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise SpecError(
            f"adapter name {name!r} must be a valid Python identifier (letters, digits, _; not starting "
            "with a digit; not a keyword): it becomes a submodule name in the adapted model",
            field="adapters",
        )
    if name in _module_attributes():
        raise SpecError(
            f"adapter name {name!r} is an attribute of torch.nn.Module (the adapter would shadow it); "
            f"choose another name, e.g. {name + '_adapter'!r}", field="adapters")
    return name


@dataclass(frozen=True)
class Spec:
    """Named adapters to insert, which of them are active, and the base seed."""

    adapters: Mapping[str, MethodSpec] = spec_field(
        help="Adapter name -> method spec. Names must be Python identifiers (they name submodules)."
    )
    active: tuple[str, ...] | Block | None = spec_field(
        None, help="The adapters active in the forward pass: None (all), a list of names (several at one linear "
        "site chain in spec order), or a composition block (Stack, Fuse, Parallel, BatchSplit, Average, Route) over "
        "adapter names."
    )
    seed: int | None = spec_field(
        0,
        help="Base initialisation seed for adapters without their own; None picks a random one "
        "when the Spec is built (not saved).",
    )
    modules_to_save: tuple[str, ...] = spec_field(
        (), help="Base modules trained whole (e.g. ['classifier'], ['score'], ['lm_head']): the adapted model "
        "owns trainable copies of their parameters (the caller's model is never written); saved, loaded, merged "
        "and exported with the adapters. A name matches a module path or its last components."
    )
    task_type: str | None = spec_field(
        None, help="PEFT's task type (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, CAUSAL_LM, SEQ_2_SEQ_LM, "
        "FEATURE_EXTRACTION): as in PEFT, the task's head modules that the model has (SEQ_CLS/TOKEN_CLS: "
        "classifier, score, pre_classifier; QUESTION_ANS: qa_outputs) are trained whole, added to "
        "modules_to_save when the spec is applied. None: only modules_to_save."
    )

    layer_replication: tuple[tuple[int, int], ...] | None = spec_field(
        None, help="PEFT's layer_replication: [start, end) ranges of the model's layers, stacked in order into a "
        "deeper model whose copies share base weights (each copy gets its own adapters), e.g. [[0, 4], [2, 6]]. "
        "Applied to a new model: the caller's is untouched. None: the model's own layers."
    )

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, Mapping):
            raise SpecError(
                f"adapters must be a mapping of names to method specs, got {type(self.adapters).__name__}",
                field="adapters",
            )
        if not self.adapters:
            raise SpecError("adapters must name at least one adapter", field="adapters")
        adapters: dict[str, MethodSpec] = {}
        for name, method in self.adapters.items():
            _check_name(name)
            if isinstance(method, Mapping):
                method = MethodSpec.from_dict(method)
            if not isinstance(method, MethodSpec):
                raise SpecError(
                    f"adapters[{name!r}] must be a method spec (LoRA, Bottleneck, …) or its dict, "
                    f"got {type(method).__name__}",
                    field="adapters",
                )
            adapters[name] = method
        object.__setattr__(self, "adapters", FrozenMapping(adapters))

        active = self.active
        if isinstance(active, Mapping) and any(k in BLOCKS for k in active):
            active = block_from_dict(active)
        if isinstance(active, Block):
            unknown = [n for n in active.names() if n not in adapters]
            if unknown:
                raise SpecError(f"active composition names {unknown[0]!r}, which is not an adapter; adapters: "
                                f"{', '.join(adapters)}", field="active")
            for blk in active.blocks():
                if isinstance(blk, Fuse) and blk.fusion_name in adapters:
                    raise SpecError(f"Fuse name {blk.fusion_name!r} collides with an adapter name; pass "
                                    "Fuse(..., name=...)", field="active")
        elif active is not None:
            if isinstance(active, str):
                active = (active,)
            elif isinstance(active, Mapping) or not isinstance(active, Iterable):
                raise SpecError(f"active must be None or a list of adapter names, got {active!r}", field="active")
            seen: list[str] = []
            for name in active:
                if name not in adapters:
                    raise SpecError(
                        f"active names {name!r}, which is not an adapter; adapters: {', '.join(adapters)}",
                        field="active",
                    )
                if name not in seen:
                    seen.append(name)
            active = tuple(seen)
        object.__setattr__(self, "active", active)
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        object.__setattr__(self, "modules_to_save", _check_modules_to_save(self.modules_to_save))
        object.__setattr__(self, "task_type", _check_task_type(self.task_type))
        if self.layer_replication is not None:
            object.__setattr__(self, "layer_replication", check_layer_map(self.layer_replication))
        # Not a field: excluded from equality, hashing and serialisation on purpose.
        object.__setattr__(self, "_fallback_seed", random.SystemRandom().randrange(2**31) if self.seed is None else self.seed)

    # -- queries
    @property
    def active_names(self) -> tuple[str, ...]:
        """Active adapter names (all adapters when ``active`` is None; every name in a composition)."""
        if self.active is None:
            return tuple(self.adapters)
        return self.active.names() if isinstance(self.active, Block) else self.active

    @property
    def module_owners(self) -> tuple[str, ...]:
        """Names that own modules under ``adapters.``: every adapter, plus the fusion layers of the active
        composition (each ``Fuse`` block's ``fusion_name``)."""
        fusions = [b.fusion_name for b in self.composition.blocks() if isinstance(b, Fuse)] if self.composition else []
        return tuple(self.adapters) + tuple(f for f in fusions if f not in self.adapters)

    @property
    def composition(self) -> Block | None:
        """The active composition block, or None when ``active`` is None or a list of names."""
        return self.active if isinstance(self.active, Block) else None

    def effective_seed(self, name: str | None) -> int:
        """Seed for adapter ``name``: its own ``seed`` if set, else the spec's (``None``: the spec's)."""
        if name is None:
            return self._fallback_seed  # type: ignore[attr-defined]
        if name not in self.adapters:
            raise SpecError(f"no adapter named {name!r}; adapters: {', '.join(self.adapters)}", field="adapters")
        own = self.adapters[name].seed
        return own if own is not None else self._fallback_seed  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> Spec:
        """A copy with ``changes`` applied (re-validated); the seed drawn for ``seed=None`` is kept."""
        new = dataclasses.replace(self, **changes)
        if self.seed is None and "seed" not in changes:
            object.__setattr__(new, "_fallback_seed", self._fallback_seed)  # type: ignore[attr-defined]
        return new

    # -- dict / JSON / YAML
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-safe); ``modules_to_save`` only when there are any."""
        d = {
            "version": FORMAT_VERSION,
            "seed": self.seed,
            "active": None if self.active is None else (
                self.active.to_dict() if isinstance(self.active, Block) else list(self.active)),
            "adapters": {name: m.to_dict() for name, m in self.adapters.items()},
        }
        if self.modules_to_save:
            d["modules_to_save"] = list(self.modules_to_save)
        if self.task_type is not None:
            d["task_type"] = self.task_type
        if self.layer_replication is not None:
            d["layer_replication"] = [list(r) for r in self.layer_replication]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Spec:
        """Inverse of :meth:`to_dict`; unknown keys are errors (they are usually typos)."""
        if not isinstance(d, Mapping):
            raise SpecError(f"a spec must be a mapping, got {type(d).__name__}", field="adapters")
        d = dict(d)
        version = d.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(f"unsupported spec format version {version!r}; this graphadapt reads {FORMAT_VERSION}", field="version")
        allowed = ("adapters", "active", "seed", "modules_to_save", "task_type", "layer_replication")
        for key in d:
            if key not in allowed:
                raise SpecError(f"unknown spec key {key!r}; keys: version, {', '.join(allowed)}", field=key)
        if "adapters" not in d:
            raise SpecError("a spec dict needs an 'adapters' mapping", field="adapters")
        adapters = d["adapters"]
        if not isinstance(adapters, Mapping):
            raise SpecError("adapters must be a mapping of names to method dicts", field="adapters")
        return cls(
            adapters={name: MethodSpec.from_dict(m) for name, m in adapters.items()},
            active=d.get("active"),
            seed=d.get("seed", 0),
            modules_to_save=d.get("modules_to_save") or (),
            task_type=d.get("task_type"),
            layer_replication=d.get("layer_replication"),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Spec:
        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            raise SpecError(f"spec is not valid YAML: {e}") from e
        return cls.from_dict(data)

    # -- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            text = self.to_json() + "\n"
        elif suffix in _YAML_SUFFIXES:
            text = self.to_yaml()
        else:
            raise SpecError(f"cannot tell the format of {str(path)!r}: use a .json, .yaml or .yml suffix")
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spec:
        """Read a spec saved by :meth:`save` (format chosen by suffix)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in _JSON_SUFFIXES + _YAML_SUFFIXES:
            raise SpecError(f"cannot tell the format of {str(path)!r}: use a .json, .yaml or .yml suffix")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read spec file {str(path)!r}: {type(e).__name__}: {e}") from e
        return cls.from_json(text) if suffix in _JSON_SUFFIXES else cls.from_yaml(text)


def _check_modules_to_save(names: Any) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    if names is None:
        return ()
    if isinstance(names, Mapping) or not isinstance(names, Iterable):
        raise SpecError(f"modules_to_save must be a list of module names, got {names!r}", field="modules_to_save")
    out: list[str] = []
    for n in names:
        if not isinstance(n, str) or not n or any(not part.isidentifier() and not part.isdigit()
                                                   for part in n.split(".")):
            raise SpecError(f"modules_to_save entry {n!r} is not a module path (e.g. 'classifier', 'lm_head', "
                            "'bert.pooler')", field="modules_to_save")
        if n not in out:
            out.append(n)
    return tuple(out)


#: PEFT task type -> the head modules PEFT trains whole for it (``modules_to_save``); names the
#: model lacks are skipped, as PEFT does.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score", "pre_classifier"),
    "TOKEN_CLS": ("classifier", "score", "pre_classifier"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}


def _check_task_type(task_type: Any) -> str | None:
    if task_type is None:
        return None
    if isinstance(task_type, str) and task_type.upper() in TASK_HEADS:
        return task_type.upper()
    raise SpecError(f"task_type {task_type!r} is not one of PEFT's task types: {', '.join(TASK_HEADS)} "
                    "(or None)", field="task_type")


_LOADER: Any = None


def _yaml_loader() -> Any:
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""
    global _LOADER
    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"),
        )
        _LOADER = Loader
    return _LOADER


def as_spec(x: Any) -> Spec:
    """Coerce ``x`` to a :class:`Spec`.

    Accepts a ``Spec``; a single method spec (becomes ``Spec({"default": x})``); a dict of
    adapter names to method specs or their dicts (``{"task": LoRA()}``, as ``Spec(x)``); a
    dict in :meth:`Spec.to_dict` form (has an ``"adapters"`` mapping), or a single method's
    dict (has ``"method"``); or a path to a ``.json``/``.yaml``/``.yml`` file.
    """
    if isinstance(x, Spec):
        return x
    if isinstance(x, MethodSpec):
        return Spec({"default": x})
    if isinstance(x, Mapping):
        if isinstance(x.get("method"), str):
            return Spec({"default": MethodSpec.from_dict(x)})
        a = x.get("adapters")
        to_dict_form = isinstance(a, Mapping) and "method" not in a
        named = any(isinstance(v, MethodSpec) or (isinstance(v, Mapping) and "method" in v) for v in x.values())
        return Spec(dict(x)) if named and not to_dict_form else Spec.from_dict(x)
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if path.suffix.lower() in _JSON_SUFFIXES + _YAML_SUFFIXES:
            if not path.is_file():
                raise SpecError(f"spec file {str(path)!r} does not exist")
            return Spec.load(path)
    raise SpecError(
        "expected a Spec, a method spec (LoRA(...), SeqBn(...), …), a spec dict, or a path to a "
        f".json/.yaml/.yml spec file; got {x!r}"
    )


__all__ = ["FORMAT_VERSION", "TASK_HEADS", "Spec", "as_spec"]
