"""Composition blocks: how active adapters combine, as plain data (validated, JSON/YAML-safe).

    Stack("a", "b")                    each adapter sees the previous one's output at each site
    Fuse("a", "b", fusion="dynamic")   AdapterFusion: attention over the children's outputs at each site
    Parallel("a", "b")                 the batch is replicated, one copy (and one output) per child
    BatchSplit("a", "b", batch_sizes=[2, 3])   rows 0-1 go through a, rows 2-4 through b
    Split("a", "b", splits=[4, 6])             sequence positions 0-3 go through a, 4-9 through b
    Average("a", "b", weights=[.7, .3])        weighted average of the children's outputs
    Route("a", "b")                    each row picks one adapter by the ``adapter_ids`` input (-1: none)
    MultiTask("a", "b")                each row goes through its task's adapter by the ``task_ids`` input

Blocks nest (``Stack("unipelt", Fuse("a", "b"))``); :data:`ALLOWED_NESTINGS` says which
nestings have a defined meaning. A block is checked against the adapters of a :class:`Spec`
when the spec is built, so an unknown name or a bad nesting is a :class:`SpecError` before
anything is captured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from graphadapt.errors import SpecError

from .base import check_bool, is_int, is_real

Child = Union[str, "Block"]

FUSION_OPTIONS = ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
                  "value_before_softmax", "value_initialized")
# AdapterHub 1.3 DynamicAdapterFusionConfig / StaticAdapterFusionConfig
FUSION_PRESETS: dict[str, dict[str, bool]] = {
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True),
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False),
}


def _children(kind: str, children: Iterable[Any]) -> tuple[Child, ...]:
    label = BLOCKS[kind].__name__ if kind in BLOCKS else kind
    out = []
    for c in children:
        if isinstance(c, Mapping):
            c = block_from_dict(c)
        if isinstance(c, Block):
            if not ALLOWED_NESTINGS[kind]:
                raise SpecError(f"{label} children are adapter names only, got a {type(c).__name__} block",
                                field="active")
            if type(c).__name__ not in ALLOWED_NESTINGS[kind]:
                raise SpecError(f"{label} cannot contain a {type(c).__name__} block (allowed inside {label}: "
                                f"{', '.join(ALLOWED_NESTINGS[kind])})", field="active")
        elif not isinstance(c, str) or not c:
            raise SpecError(f"{label} children must be adapter names or blocks, got {c!r}", field="active")
        out.append(c)
    if not out:
        raise SpecError(f"{label} needs at least one child", field="active")
    return tuple(out)


@dataclass(frozen=True, init=False)
class Block:
    """Base of composition blocks: ordered children (adapter names or blocks)."""

    kind: ClassVar[str] = ""
    children: tuple[Child, ...] = ()

    def __init__(self, *children: Child):
        object.__setattr__(self, "children", _children(self.kind, children))
        self._validate()

    def _validate(self) -> None:
        pass

    # -- queries
    def names(self) -> tuple[str, ...]:
        """Every adapter name in the tree, in order, without repeats."""
        out: list[str] = []
        for c in self.children:
            for n in (c.names() if isinstance(c, Block) else (c,)):
                if n not in out:
                    out.append(n)
        return tuple(out)

    def blocks(self) -> Iterable[Block]:
        """This block and every nested block, depth first."""
        yield self
        for c in self.children:
            if isinstance(c, Block):
                yield from c.blocks()

    @property
    def parallel_channels(self) -> int:
        own = len(self.children) if isinstance(self, Parallel) else 1
        return max([own] + [c.parallel_channels for c in self.children if isinstance(c, Block)])

    # -- serialisation
    def _options(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: [c.to_dict() if isinstance(c, Block) else c for c in self.children], **self._options()}

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        opts = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({inner}{opts})"


@dataclass(frozen=True, init=False, repr=False)
class Stack(Block):
    """Each child reads the previous child's output at every site (AdapterHub's ``Stack``)."""

    kind: ClassVar[str] = "stack"

    def _validate(self) -> None:
        names = [c for c in self.children if isinstance(c, str)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpecError(f"Stack names adapter {twice[0]!r} twice: it would run twice in a row on its own output; "
                            "name each adapter once (add a second adapter to stack two of the same kind)",
                            field="active")


@dataclass(frozen=True, init=False, repr=False)
class Parallel(Block):
    """The batch is replicated once per child; copy ``i`` goes through child ``i`` (outputs stacked on the batch)."""

    kind: ClassVar[str] = "parallel"

    def _validate(self) -> None:
        if len(self.children) < 2:
            raise SpecError("Parallel needs at least two children", field="active")


@dataclass(frozen=True, init=False, repr=False)
class BatchSplit(Block):
    """Rows ``[sum(sizes[:i]), sum(sizes[:i+1]))`` of the batch go through child ``i``."""

    kind: ClassVar[str] = "batch_split"
    batch_sizes: tuple[int, ...] = ()

    def __init__(self, *children: Child, batch_sizes: Iterable[int]):
        object.__setattr__(self, "batch_sizes", tuple(batch_sizes) if isinstance(batch_sizes, Iterable) else batch_sizes)
        super().__init__(*children)

    def _validate(self) -> None:
        sizes = self.batch_sizes
        if not isinstance(sizes, tuple) or not all(is_int(s) and s > 0 for s in sizes):
            raise SpecError(f"BatchSplit batch_sizes must be a list of integers > 0, got {sizes!r}", field="active")
        if len(sizes) != len(self.children):
            raise SpecError(f"BatchSplit has {len(self.children)} children but {len(sizes)} batch_sizes {list(sizes)}",
                            field="active")

    def _options(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


@dataclass(frozen=True, init=False, repr=False)
class Split(Block):
    """Sequence positions ``[sum(splits[:i]), sum(splits[:i+1]))`` go through child ``i`` (AdapterHub's ``Split``;
    the sequence must be ``sum(splits)`` long). ``splits``: one length per child, or one int for all."""

    kind: ClassVar[str] = "split"
    splits: tuple[int, ...] = ()

    def __init__(self, *children: Child, splits: Iterable[int] | int):
        if is_int(splits):
            splits = (splits,) * len(children)
        object.__setattr__(self, "splits", tuple(splits) if isinstance(splits, Iterable) else splits)
        super().__init__(*children)

    def _validate(self) -> None:
        sizes = self.splits
        if not isinstance(sizes, tuple) or not all(is_int(s) and s > 0 for s in sizes):
            raise SpecError(f"Split splits must be a list of integers > 0, got {sizes!r}", field="active")
        if len(sizes) != len(self.children):
            raise SpecError(f"Split has {len(self.children)} children but {len(sizes)} splits {list(sizes)}",
                            field="active")
        if len(self.children) < 2:
            raise SpecError("Split needs at least two children", field="active")

    def _options(self) -> dict[str, Any]:
        return {"splits": list(self.splits)}


@dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """``Σ wᵢ · outᵢ`` with weights normalised to sum 1 (a true weighted average).

    ``adapterhub_mean=True`` reproduces AdapterHub 1.3, which normalises the weights and then
    also takes the mean over the children, i.e. ``Σ wᵢ · outᵢ / N``.
    """

    kind: ClassVar[str] = "average"
    weights: tuple[float, ...] | None = None
    normalize_weights: bool = field(default=True, compare=False)  # applied at construction
    adapterhub_mean: bool = False

    def __init__(self, *children: Child, weights: Iterable[float] | None = None, normalize_weights: bool = True,
                 adapterhub_mean: bool = False):
        object.__setattr__(self, "weights", None if weights is None else tuple(weights))
        object.__setattr__(self, "normalize_weights", check_bool("normalize_weights", normalize_weights))
        object.__setattr__(self, "adapterhub_mean", check_bool("adapterhub_mean", adapterhub_mean))
        super().__init__(*children)

    def _validate(self) -> None:
        w = self.weights
        n = len(self.children)
        if w is None:
            w = tuple(1.0 / n for _ in range(n))
        elif len(w) != n or not all(is_real(x) and math.isfinite(x) for x in w):
            raise SpecError(f"Average weights must be {n} finite numbers (one per child), got {list(w)}", field="active")
        elif self.normalize_weights:
            total = float(sum(w))
            if total == 0:
                raise SpecError("Average weights sum to 0; they cannot be normalised", field="active")
            w = tuple(float(x) / total for x in w)
        object.__setattr__(self, "weights", tuple(float(x) for x in w))

    def effective_weights(self) -> tuple[float, ...]:
        n = len(self.children)
        return tuple(x / n for x in self.weights) if self.adapterhub_mean else self.weights

    def _options(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "normalize_weights": False, "adapterhub_mean": self.adapterhub_mean}


@dataclass(frozen=True, init=False, repr=False)
class Fuse(Block):
    """AdapterFusion (Pfeiffer et al., 2021) over the children at every site they share.

    ``fusion``: ``"dynamic"`` (query, key, value matrices; value initialised near identity;
    regularisation towards identity) or ``"static"`` (no value matrix), AdapterHub's presets;
    any option of :data:`FUSION_OPTIONS` overrides the preset. ``temperature=True`` anneals the
    softmax temperature from 50 to 1 in steps of 0.05 per training call, as AdapterHub does.
    ``name``: the adapter name the fusion parameters live under (default: children joined by ``_``).
    """

    kind: ClassVar[str] = "fuse"
    fusion: str = "dynamic"
    options: tuple[tuple[str, bool], ...] = ()
    name: str | None = None

    def __init__(self, *children: Child, fusion: str = "dynamic", name: str | None = None, **options: bool):
        object.__setattr__(self, "fusion", fusion)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        super().__init__(*children)

    def _validate(self) -> None:
        if self.fusion not in FUSION_PRESETS:
            raise SpecError(f"Fuse fusion must be one of {', '.join(FUSION_PRESETS)}, got {self.fusion!r}",
                            field="active")
        for k, v in self.options:
            if k not in FUSION_OPTIONS:
                raise SpecError(f"Fuse has no option {k!r}; options: {', '.join(FUSION_OPTIONS)}", field="active")
            check_bool(k, v)
        if len(self.children) < 2:
            raise SpecError("Fuse needs at least two children (fusing one adapter is that adapter)", field="active")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.isidentifier()):
            raise SpecError(f"Fuse name must be a Python identifier, got {self.name!r}", field="active")

    @property
    def config(self) -> dict[str, bool]:
        return {**FUSION_PRESETS[self.fusion], **dict(self.options)}

    @property
    def fusion_name(self) -> str:
        return self.name or "_".join(self.names())

    def _options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fusion": self.fusion, **dict(self.options)}
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True, init=False, repr=False)
class Route(Block):
    """Per-row routing: the adapted model takes one more input, ``adapter_ids`` (int64 ``[batch]``); row ``j``
    runs only adapter ``children[adapter_ids[j]]``, and ``-1`` runs the base model (no adapter).

    Children are adapter names (no nested blocks), each named once. Linear-site adapters with a stacked form
    (LoRA, DoRA, IA3) are evaluated as one gathered batched product; others run per row by selection
    (graphadapt.composition.route).
    """

    kind: ClassVar[str] = "route"

    def _validate(self) -> None:
        names = list(self.children)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpecError(f"Route names adapter {twice[0]!r} twice; each adapter gets one id (its position in "
                            "the Route)", field="active")


@dataclass(frozen=True, init=False, repr=False)
class MultiTask(Block):
    """AdapterHub's ``MultiTask``: the adapted model takes one more input, ``task_ids`` (int64 ``[batch]``, or a
    list of the children's names); row ``j`` goes through ``children[task_ids[j]]`` only. Unlike ``Route`` there
    is no base-model id (AdapterHub has none): every id is in ``[0, N)``.

    Children are adapter names (AdapterHub also nests Stack/Average/Fuse here; graphadapt does not yet).
    Evaluated by graphadapt.composition.multitask (Route's per-row machinery, its own input and ids).
    """

    kind: ClassVar[str] = "multi_task"

    def _validate(self) -> None:
        names = list(self.children)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpecError(f"MultiTask names adapter {twice[0]!r} twice; each task is one adapter (its task id is "
                            "its position in the MultiTask)", field="active")


BLOCKS: dict[str, type[Block]] = {b.kind: b for b in (Stack, Fuse, Parallel, BatchSplit, Average, Split, Route,
                                                      MultiTask)}
ALLOWED_NESTINGS: dict[str, tuple[str, ...]] = {  # AdapterHub 1.3's ALLOWED_NESTINGS
    "stack": ("Stack", "Fuse", "Parallel", "BatchSplit", "Average", "Split"),
    "fuse": ("Stack",),
    "parallel": ("Stack", "BatchSplit", "Average"),
    "batch_split": ("Stack", "BatchSplit", "Average", "Split"),
    "average": ("Stack", "BatchSplit", "Split"),
    "split": ("Split", "Stack", "BatchSplit", "Average"),
    "route": (),
    "multi_task": (),  # AdapterHub: Stack, Average, Fuse (not yet in graphadapt)
}


def block_from_dict(d: Mapping[str, Any]) -> Block:
    """Inverse of :meth:`Block.to_dict` (``{"stack": [...]}``, ``{"fuse": [...], "fusion": "static"}``, …)."""
    kinds = [k for k in d if k in BLOCKS]
    if len(kinds) != 1:
        raise SpecError(f"a composition dict needs exactly one of {', '.join(BLOCKS)}; got keys {list(d)}",
                        field="active")
    kind = kinds[0]
    children = d[kind]
    if isinstance(children, (str, Mapping)) or not isinstance(children, Iterable):
        raise SpecError(f"{kind}: children must be a list, got {children!r}", field="active")
    opts = {k: v for k, v in d.items() if k != kind}
    try:
        return BLOCKS[kind](*children, **opts)
    except TypeError as e:
        raise SpecError(f"{kind}: {e}", field="active") from e


__all__ = ["ALLOWED_NESTINGS", "Average", "BLOCKS", "BatchSplit", "Block", "FUSION_OPTIONS", "FUSION_PRESETS", "Fuse",
           "MultiTask", "Parallel", "Route", "Split", "Stack", "block_from_dict"]
