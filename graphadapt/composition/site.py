"""Evaluate a composition tree at one site.

A tree is the active :class:`~graphadapt.spec.composition.Block` pruned to the adapters present at the
site (:func:`prune`), as typed, frozen nodes kept all the way to evaluation:

    Leaf(name) | StackNode(children) | FuseNode(fusion_name, config, children)
    | AverageNode(weights, children) | SplitNode(children, sizes=… (BatchSplit) or channels=… (Parallel))

A child of a :class:`SplitNode` may be None (those rows pass through unchanged, as in AdapterHub).

**Residual sites** (bottleneck-style modules implementing :class:`ResidualSiteModule`: ``pre``/``core``/
``post``) reproduce AdapterHub 1.3 exactly: a :class:`ResidualState` flows through the Stack (``pre``
before every named child), Fuse (``pre`` of the last child with the fusion query, the children's ``up``
fused), BatchSplit / Parallel / Average (``pre`` of the first child once), then ``post`` of the last adapter.

**Linear sites** (modules called ``(x, y, W, b) → y'``; LoRA, IA3, …) have no AdapterHub counterpart;
graphadapt defines: Stack = each reads the previous output; Average = ``Σ wᵢ fᵢ(x, y)``; BatchSplit /
Parallel = rows through each child; Fuse = fusion over the children's deltas ``dᵢ = fᵢ(x, y) − y`` with
query ``y`` and residual ``y``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

from ..spec.composition import Average, BatchSplit, Fuse, Parallel, Route, Stack


# --------------------------------------------------------------------------- the typed tree
@dataclass(frozen=True)
class Leaf:
    """One adapter."""

    name: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Inner:
    children: tuple

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for k in self.children if k is not None for n in k.names)

    label = ""

    def describe(self) -> str:
        return f"{self.label}({', '.join('-' if k is None else k.describe() for k in self.children)})"


@dataclass(frozen=True)
class StackNode(_Inner):
    """Each child reads the previous one's output."""

    label = "Stack"


@dataclass(frozen=True)
class FuseNode(_Inner):
    """AdapterFusion over the children (``config``: the fusion options as sorted ``(key, value)`` pairs)."""

    fusion_name: str = ""
    config: tuple = ()
    label = "Fuse"


@dataclass(frozen=True)
class AverageNode(_Inner):
    """``Σ wᵢ · childᵢ`` (weights of the live children only)."""

    weights: tuple = ()
    label = "Average"


@dataclass(frozen=True)
class SplitNode(_Inner):
    """Rows of the batch through each child: ``sizes`` (BatchSplit, fixed row counts) or ``channels``
    (Parallel: the batch was replicated ``channels`` times, equal parts). Written once for both."""

    sizes: tuple[int, ...] | None = None
    channels: int | None = None

    @property
    def label(self) -> str:  # type: ignore[override]
        return "BatchSplit" if self.sizes is not None else "Parallel"

    def bounds(self, batch: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` rows of each child for a batch of ``batch`` rows (ValueError saying how to fix it)."""
        if self.sizes is not None:
            if sum(self.sizes) != batch:
                raise ValueError(f"BatchSplit batch_sizes {list(self.sizes)} sum to {sum(self.sizes)}, but the batch "
                                 f"has {batch} rows; call with a batch of that size or change batch_sizes")
            sizes = list(self.sizes)
        else:
            n = self.channels
            if batch % n:
                raise ValueError(f"Parallel with {n} channels needs a batch divisible by {n}, got {batch}")
            sizes = [batch // n] * n
        out, a = [], 0
        for s in sizes:
            out.append((a, a + s))
            a += s
        return out


@dataclass(frozen=True)
class RouteNode(_Inner):
    """Per-row routing: row ``j`` runs child ``adapter_ids[j]`` (``-1``: none). Children keep their Route position;
    a child absent at the site is None (its rows pass through unchanged there). Evaluated by
    :mod:`graphadapt.composition.route`."""

    label = "Route"


Tree = Union[Leaf, StackNode, FuseNode, AverageNode, SplitNode, RouteNode]


def prune(node: Any, present: Iterable[str]) -> Optional[Tree]:
    """The tree of ``node`` (a block or an adapter name) restricted to the adapter names in ``present``
    (None when none is)."""
    present = set(present)
    if isinstance(node, str):
        return Leaf(node) if node in present else None
    kids = [prune(c, present) for c in node.children]
    if isinstance(node, Route):  # positions are the ids: keep every slot, even with one live child
        return None if all(k is None for k in kids) else RouteNode(tuple(kids))
    if isinstance(node, (BatchSplit, Parallel)):
        if all(k is None for k in kids):
            return None
        if isinstance(node, BatchSplit):
            return SplitNode(tuple(kids), sizes=tuple(node.batch_sizes))
        return SplitNode(tuple(kids), channels=len(node.children))
    live = [k for k in kids if k is not None]
    if not live:
        return None
    if isinstance(node, Stack):
        return live[0] if len(live) == 1 else StackNode(tuple(live))
    if isinstance(node, Fuse):
        return FuseNode(tuple(live), fusion_name=node.fusion_name, config=tuple(sorted(node.config.items())))
    if isinstance(node, Average):
        w = node.effective_weights()
        return AverageNode(tuple(live), weights=tuple(w[i] for i, k in enumerate(kids) if k is not None))
    raise TypeError(f"unknown block {type(node).__name__}")


def tree_names(tree: Optional[Tree]) -> list[str]:
    return [] if tree is None else list(tree.names)


def first_name(tree: Tree) -> str:
    return tree.names[0]


def last_name(tree: Tree) -> str:
    return tree.names[-1]


def fusions(tree: Optional[Tree]) -> list[tuple[str, dict]]:
    """``(fusion name, config)`` of every Fuse in the tree."""
    if tree is None or isinstance(tree, Leaf):
        return []
    out = [(tree.fusion_name, dict(tree.config))] if isinstance(tree, FuseNode) else []
    return out + [f for k in tree.children for f in fusions(k)]


def describe(tree: Optional[Tree]) -> str:
    return "-" if tree is None else tree.describe()


# --------------------------------------------------------------------------- module protocols
@runtime_checkable
class ResidualSiteModule(Protocol):
    """What a residual-site module (bottleneck adapters) offers composition, besides ``forward(h, r, ln_w, ln_b)``.
    A lone adapter's forward is ``post(core(pre(…)))``; composition calls the three steps itself."""

    def pre(self, hidden: Tensor, input_tensor: Tensor, ln_weight, ln_bias, query_before_ln: bool = False
            ) -> tuple[Tensor, Tensor, Tensor]:
        """``(hidden for the adapter, fusion query, adapter residual)``."""

    def core(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, up-projection)`` of the adapter proper (Fuse attends over the children's ``up``)."""

    def post(self, hidden: Tensor, h: Tensor, input_tensor: Tensor, ln_weight, ln_bias) -> Tensor:
        """The residual point's output (the model's norm applied where the adapter's config puts it)."""


class ResidualState(NamedTuple):
    """What flows between the steps of a residual-site composition."""

    hidden: Tensor
    input: Tensor
    residual: Tensor
    up: Optional[Tensor]
    last: Optional[str]


# --------------------------------------------------------------------------- evaluation
class _Composition(nn.Module):
    """Holds references (not submodules: their parameters stay under their own adapter) to the
    adapter modules and fusion layers it calls."""

    def __init__(self, tree: Tree, modules: dict[str, nn.Module], fusion_layers: dict[str, nn.Module]):
        super().__init__()
        self.tree = tree
        object.__setattr__(self, "_mods", dict(modules))
        object.__setattr__(self, "_fusions", dict(fusion_layers))

    mergeable = False
    merge_refusal = "composed site (its adapters are combined by a composition block); deactivate the composition to merge"

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def extra_repr(self) -> str:
        return describe(self.tree)


class ResidualComposition(_Composition):
    """``(h, r, ln_w, ln_b) → out`` for a tree of :class:`ResidualSiteModule`\\ s."""

    def forward(self, h: Tensor, residual: Tensor, ln_weight=None, ln_bias=None) -> Tensor:
        ln = (ln_weight, ln_bias)
        state = self._eval(self.tree, ResidualState(h, residual, residual, None, None), ln)
        return self._mods[state.last].post(state.hidden, h, state.input, ln_weight, ln_bias)

    def _pre(self, name: str, state: ResidualState, ln, query_before_ln: bool = False):
        x, query, res = self._mods[name].pre(state.hidden, state.input, *ln, query_before_ln=query_before_ln)
        return state._replace(hidden=x, residual=res), query

    def _single(self, name: str, state: ResidualState) -> ResidualState:
        out, up = self._mods[name].core(state.hidden, state.residual)
        return state._replace(hidden=out, up=up, last=name)

    def _eval(self, tree: Tree, state: ResidualState, ln) -> ResidualState:
        """A Stack position: a name runs its own ``pre`` first (a lone adapter is Stack(name))."""
        if isinstance(tree, Leaf):
            state, _ = self._pre(tree.name, state, ln)
            return self._single(tree.name, state)
        if isinstance(tree, StackNode):
            for k in tree.children:
                state = self._eval(k, state, ln)
            return state
        return self._block(tree, state, ln)

    def _child(self, k: Tree, state: ResidualState, ln) -> ResidualState:
        """A child of a non-Stack block: a name runs without its own ``pre`` (the block ran one)."""
        return self._single(k.name, state) if isinstance(k, Leaf) else self._block(k, state, ln)

    def _block(self, tree: Tree, state: ResidualState, ln) -> ResidualState:
        if isinstance(tree, StackNode):
            return self._eval(tree, state, ln)
        if isinstance(tree, FuseNode):
            last = last_name(tree)
            state, query = self._pre(last, state, ln, query_before_ln=dict(tree.config)["query_before_ln"])
            outs = [self._child(k, state, ln) for k in tree.children]
            ups = torch.stack([o.up for o in outs]).permute(1, 2, 0, 3)
            hidden = self._fusions[tree.fusion_name](query, ups, ups, state.residual)
            return state._replace(hidden=hidden, last=last)
        if isinstance(tree, AverageNode):
            state, _ = self._pre(first_name(tree), state, ln)
            outs = [self._child(k, state, ln) for k in tree.children]
            hidden = sum(w * o.hidden for w, o in zip(tree.weights, outs))
            return state._replace(hidden=hidden, up=outs[0].up, last=outs[-1].last)
        if isinstance(tree, SplitNode):
            bounds = tree.bounds(state.hidden.shape[0])
            state, _ = self._pre(first_name(tree), state, ln)
            outs, last = [], state.last
            for k, (a, b) in zip(tree.children, bounds):
                part = ResidualState(*(None if t is None or not isinstance(t, Tensor) else t[a:b]
                                       for t in state[:4]), state.last)
                if k is None:
                    outs.append(part)
                    continue
                o = self._child(k, part, ln)
                outs.append(o)
                last = o.last or last
            cat = [torch.cat([o[i] for o in outs], 0) for i in range(3)]
            up = None if any(o.up is None for o in outs) else torch.cat([o.up for o in outs], 0)
            return ResidualState(cat[0], cat[1], cat[2], up, last)
        raise TypeError(f"unknown composition node {type(tree).__name__}")


class LinearComposition(_Composition):
    """``(x, y, W, b) → y'`` for a tree of linear-site adapters (see the module docstring)."""

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias=None) -> Tensor:
        return self._eval(self.tree, x, y, weight, bias)

    def _eval(self, tree: Tree, x, y, w, b):
        if isinstance(tree, Leaf):
            return self._mods[tree.name](x, y, w, b)
        if isinstance(tree, StackNode):
            for k in tree.children:
                y = self._eval(k, x, y, w, b)
            return y
        if isinstance(tree, AverageNode):
            return sum(wt * self._eval(k, x, y, w, b) for wt, k in zip(tree.weights, tree.children))
        if isinstance(tree, FuseNode):
            deltas = torch.stack([self._eval(k, x, y, w, b) - y for k in tree.children], dim=-2)
            return self._fusions[tree.fusion_name](y, deltas, deltas, y)
        if isinstance(tree, SplitNode):
            outs = []
            for k, (a, e) in zip(tree.children, tree.bounds(y.shape[0])):
                xs, ys = x[a:e], y[a:e]
                outs.append(ys if k is None else self._eval(k, xs, ys, w, b))
            return torch.cat(outs, 0)
        raise TypeError(f"unknown composition node {type(tree).__name__}")


__all__ = ["AverageNode", "FuseNode", "Leaf", "LinearComposition", "ResidualComposition", "ResidualSiteModule",
           "ResidualState", "RouteNode", "SplitNode", "StackNode", "Tree", "describe", "first_name", "fusions", "last_name",
           "prune", "tree_names"]
