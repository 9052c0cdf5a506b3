"""Evaluate a composition tree at one site.

A tree is the active :class:`~graphadapt.spec.composition.Block` pruned to the adapters present at the
site (:func:`prune`), as typed, frozen nodes kept all the way to evaluation:

    Leaf(name) | StackNode(children) | FuseNode(fusion_name, config, children)
    | AverageNode(weights, children) | SplitNode(children, sizes=… (BatchSplit; Split with axis=1) or
      channels=… (Parallel))

A child of a :class:`SplitNode` may be None (those rows pass through unchanged, as in AdapterHub; at a
sequence Split AdapterHub drops that part of the sequence, which no later layer can use — graphadapt passes it
through).

**Residual sites** (bottleneck-style modules implementing :class:`ResidualSiteModule`: ``pre``/``core``/
``post``) reproduce AdapterHub 1.3 exactly: a :class:`ResidualState` flows through the Stack (``pre``
before every named child), Fuse (``pre`` of the last child with the fusion query, the children's ``up``
fused), BatchSplit / Split / Parallel / Average (``pre`` of the first child once), then ``post`` of the last adapter.

**Linear sites** (modules called ``(x, y, W, b) → y'``; LoRA, IA3, …) have no AdapterHub counterpart;
graphadapt defines: Stack = each reads the previous output; Average = ``Σ wᵢ fᵢ(x, y)``; BatchSplit /
Parallel = rows through each child; Split = sequence positions through each child (``[B, T, …]`` sites);
Fuse = fusion over the children's deltas ``dᵢ = fᵢ(x, y) − y`` with
query ``y`` and residual ``y``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

from ..spec.composition import Average, BatchSplit, Fuse, MultiTask, Parallel, Route, Split, Stack


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
    axis: int = 0
    """0: rows of the batch (BatchSplit, Parallel); 1: positions of the sequence (Split)."""

    @property
    def label(self) -> str:  # type: ignore[override]
        return "Split" if self.axis == 1 else "BatchSplit" if self.sizes is not None else "Parallel"

    def part(self, t: Tensor, a: int, b: int) -> Tensor:
        """``t``'s slice ``[a, b)`` along this node's axis."""
        return t[a:b] if self.axis == 0 else t[:, a:b]

    def bounds(self, batch: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` rows of each child for a batch of ``batch`` rows (ValueError saying how to fix it)."""
        if self.axis == 1:
            if sum(self.sizes) != batch:
                raise ValueError(f"Split splits {list(self.sizes)} sum to {sum(self.sizes)}, but the sequence has "
                                 f"{batch} positions; call with a sequence of that length or change splits")
            sizes = list(self.sizes)
        elif self.sizes is not None:
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
    ids_input = "adapter_ids"   # the graph input holding each row's child index
    base_id = True              # whether -1 (no adapter) is a valid id


@dataclass(frozen=True)
class MultiTaskNode(RouteNode):
    """AdapterHub's ``MultiTask``: row ``j`` runs child ``task_ids[j]`` (every id in ``[0, N)``, no base id).
    Evaluated by Route's per-row machinery (:mod:`graphadapt.composition.multitask`)."""

    label = "MultiTask"
    ids_input = "task_ids"
    base_id = False


Tree = Union[Leaf, StackNode, FuseNode, AverageNode, SplitNode, RouteNode, MultiTaskNode]


def prune(node: Any, present: Iterable[str]) -> Optional[Tree]:
    """The tree of ``node`` (a block or an adapter name) restricted to the adapter names in ``present``
    (None when none is)."""
    present = set(present)
    if isinstance(node, str):
        return Leaf(node) if node in present else None
    kids = [prune(c, present) for c in node.children]
    if isinstance(node, (Route, MultiTask)):  # positions are the ids: keep every slot, even with one live child
        node_type = RouteNode if isinstance(node, Route) else MultiTaskNode
        return None if all(k is None for k in kids) else node_type(tuple(kids))
    if isinstance(node, (BatchSplit, Parallel, Split)):
        if all(k is None for k in kids):
            return None
        if isinstance(node, Split):
            return SplitNode(tuple(kids), sizes=tuple(node.splits), axis=1)
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


class RoutedBranch(NamedTuple):
    """A residual-site module's adapter branch as stackable terms for per-row routing (``Route``):
    ``branch(x) = scale ⊙ (act(x Dᵀ + d) Uᵀ + u)`` with ``down_w [r, d]``, ``down_b [r]``, ``up_w [d, r]``,
    ``up_b [d]``, ``scale`` a float or a ``[1]``/``[d]`` tensor (live tensors: gradients flow). ``key`` holds
    everything else the module's ``pre``/``core``/``post`` depend on: adapters whose keys are equal share those
    steps and differ only in these tensors; ``parallel`` says whether ``core`` adds the adapter residual."""

    down_w: Tensor
    down_b: Tensor
    up_w: Tensor
    up_b: Tensor
    scale: Any
    act: Any
    key: tuple
    parallel: bool


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
            ax = tree.axis
            bounds = tree.bounds(state.hidden.shape[ax])
            state, _ = self._pre(first_name(tree), state, ln)
            outs, last = [], state.last
            for k, (a, b) in zip(tree.children, bounds):
                part = ResidualState(*(None if t is None or not isinstance(t, Tensor) else tree.part(t, a, b)
                                       for t in state[:4]), state.last)
                if k is None:
                    outs.append(part)
                    continue
                o = self._child(k, part, ln)
                outs.append(o)
                last = o.last or last
            cat = [torch.cat([o[i] for o in outs], ax) for i in range(3)]
            up = None if any(o.up is None for o in outs) else torch.cat([o.up for o in outs], ax)
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
            if tree.axis == 1 and (y.dim() < 3 or x.dim() < 3):
                raise ValueError(f"Split divides the sequence axis of [batch, sequence, …] activations; this linear "
                                 f"site sees {tuple(y.shape)} (a flattened sequence): use Split on another site")
            outs = []
            for k, (a, e) in zip(tree.children, tree.bounds(y.shape[tree.axis])):
                xs, ys = tree.part(x, a, e), tree.part(y, a, e)
                outs.append(ys if k is None else self._eval(k, xs, ys, w, b))
            return torch.cat(outs, tree.axis)
        raise TypeError(f"unknown composition node {type(tree).__name__}")


def attention_refusal(tree: Optional[Tree]) -> str | None:
    """Why ``tree`` has no meaning at an attention core (None: it has one). AdapterHub's prefix layer composes
    Stack, BatchSplit and Parallel; its ``Average`` raises ``NotImplementedError`` and it has no Fuse or Split."""
    if tree is None or isinstance(tree, Leaf):
        return None
    if isinstance(tree, AverageNode):
        return ("Average is not defined over prefixes (AdapterHub's prefix tuning raises NotImplementedError for it); "
                "average the prefixes' weights instead with average_adapter, or use Stack/BatchSplit/Parallel")
    if isinstance(tree, FuseNode):
        return "AdapterFusion fuses bottleneck adapters' outputs, not prefixes; use Stack/BatchSplit/Parallel"
    if isinstance(tree, SplitNode) and tree.axis == 1:
        return "Split divides the sequence between bottleneck adapters; prefixes extend the keys of every position"
    for k in tree.children:
        why = attention_refusal(k)
        if why:
            return why
    return None


class AttentionComposition(_Composition):
    """``(kvs, k, v, x, q, masks) → (k', v', *masks')`` for a tree of prefix modules at one attention core
    (``kvs``: each adapter's pool tensor, in ``tree.names`` order), as AdapterHub's prefix layer composes them:

    - Stack: each child prepends its prefix to what the previous one returned (``[P_b; P_a; k]``);
    - BatchSplit / Parallel: each child's rows get its prefix (a missing child: none); rows whose prefixes are
      shorter are padded at the front to the longest with keys/values 0 that their masks exclude.

    ``mask_kinds`` (``bool``: True attends, ``additive``, ``fill``: True is masked) say how to pad the masks."""

    def __init__(self, tree: Tree, modules: dict[str, nn.Module], mask_kinds: tuple[str, ...]):
        super().__init__(tree, modules, {})
        self.mask_kinds = tuple(mask_kinds)

    def forward(self, kvs, k: Tensor, v: Tensor, x, q, masks: list):
        kv = dict(zip(self.tree.names, kvs))
        return tuple(self._eval(self.tree, kv, k, v, x, q, list(masks)))

    def _eval(self, tree: Tree, kv, k, v, x, q, masks):
        if isinstance(tree, Leaf):
            return list(self._mods[tree.name](kv[tree.name], k, v, x, q, masks))
        if isinstance(tree, StackNode):
            for c in tree.children:
                k, v, *masks = self._eval(c, kv, k, v, x, q, masks)
            return [k, v, *masks]
        if isinstance(tree, SplitNode):
            b = k.shape[0]
            full = [self._rows(m, q, k, b) for m in masks]
            outs = []
            for c, (s, e) in zip(tree.children, tree.bounds(b)):
                part = [t[s:e] if isinstance(t, Tensor) else t for t in (k, v, x, q)]
                ms = [m[s:e] for m in full]
                outs.append([part[0], part[1], *ms] if c is None else self._eval(c, kv, *part, ms))
            longest = max(o[0].shape[2] for o in outs)
            outs = [self._pad_front(o, longest) for o in outs]
            return [torch.cat([o[i] for o in outs], 0) for i in range(len(outs[0]))]
        raise TypeError(f"{type(tree).__name__} is not composable at an attention core")

    @staticmethod
    def _rows(m: Optional[Tensor], q: Tensor, k: Tensor, b: int) -> Tensor:
        """``m`` as a ``[b, …, Tq, Tk]`` mask with one row per batch row (a missing causal mask made explicit)."""
        if m is None:  # is_causal: the explicit mask, as the prefix modules make it (top-left aligned, as SDPA)
            m = torch.ones((q.shape[-2], k.shape[-2]), dtype=torch.bool, device=k.device).tril()
        while m.dim() < 4:
            m = m.unsqueeze(0)
        return m.expand(b, *m.shape[1:])

    def _pad_front(self, out: list, longest: int) -> list:
        k, v, *masks = out
        n = longest - k.shape[2]
        if n == 0:
            return out
        z = k.new_zeros((k.shape[0], k.shape[1], n, k.shape[3]))
        padded = []
        for m, kind in zip(masks, self.mask_kinds):
            shape = (*m.shape[:-1], n)
            if kind == "bool":
                fill = torch.zeros(shape, dtype=torch.bool, device=m.device)
            elif kind == "fill":
                fill = torch.ones(shape, dtype=torch.bool, device=m.device)
            else:
                fill = torch.full(shape, torch.finfo(m.dtype).min, dtype=m.dtype, device=m.device)
            padded.append(torch.cat([fill, m], -1))
        return [torch.cat([z, k], 2), torch.cat([v.new_zeros(z.shape[:3] + v.shape[3:]), v], 2), *padded]


__all__ = ["AttentionComposition", "AverageNode", "FuseNode", "Leaf", "LinearComposition", "ResidualComposition", "ResidualSiteModule",
           "MultiTaskNode", "ResidualState", "RoutedBranch", "RouteNode", "SplitNode", "StackNode", "Tree", "describe", "first_name", "fusions", "last_name",
           "attention_refusal", "prune", "tree_names"]
