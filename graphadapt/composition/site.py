"""Evaluate a composition tree at one site.

Trees are the active :class:`~graphadapt.spec.composition.Block` pruned to the adapters present
at the site (:func:`prune`), as nested tuples::

    ("name", n) | ("stack", kids) | ("fuse", fusion_name, config, kids) | ("average", weights, kids)
    | ("batch_split", sizes, kids) | ("parallel", channels, kids)

where a ``kids`` entry of a batch_split/parallel may be None (that slice passes through
unchanged, as in AdapterHub).

**Residual sites** (bottleneck adapters; modules with ``pre``/``core``/``post``) reproduce
AdapterHub 1.3 exactly: a state ``(hidden, input, adapter_residual, up, last)`` flows through
``compose_stack`` (``pre`` before every named child), ``compose_fuse`` (``pre`` of the last child
with the fusion query, children's ``up`` fused), ``compose_batch_split`` / ``compose_parallel``
/ ``compose_average`` (``pre`` of the first child once), then ``post`` of the last adapter.

**Linear sites** (modules called ``(x, y, W, b) → y'``; LoRA, IA3, …) have no AdapterHub
counterpart; graphadapt defines: Stack = each reads the previous output; Average =
``Σ wᵢ fᵢ(x, y)``; BatchSplit / Parallel = rows through each child; Fuse = fusion over the
children's deltas ``dᵢ = fᵢ(x, y) − y`` with query ``y`` and residual ``y``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..spec.composition import Average, BatchSplit, Fuse, Parallel, Stack


def prune(node: Any, present: Iterable[str]) -> tuple | None:
    """The tree of ``node`` restricted to the adapter names in ``present`` (None when none is)."""
    present = set(present)
    if isinstance(node, str):
        return ("name", node) if node in present else None
    kids = [prune(c, present) for c in node.children]
    if isinstance(node, (BatchSplit, Parallel)):
        if all(k is None for k in kids):
            return None
        if isinstance(node, BatchSplit):
            return ("batch_split", tuple(node.batch_sizes), tuple(kids))
        return ("parallel", len(node.children), tuple(kids))
    live = [k for k in kids if k is not None]
    if not live:
        return None
    if isinstance(node, Stack):
        return live[0] if len(live) == 1 else ("stack", tuple(live))
    if isinstance(node, Fuse):
        return ("fuse", node.fusion_name, tuple(sorted(node.config.items())), tuple(live))
    if isinstance(node, Average):
        w = node.effective_weights()
        return ("average", tuple(w[i] for i, k in enumerate(kids) if k is not None), tuple(live))
    raise TypeError(f"unknown block {type(node).__name__}")


def tree_names(tree) -> list[str]:
    if tree is None:
        return []
    if tree[0] == "name":
        return [tree[1]]
    return [n for k in tree[-1] for n in tree_names(k)]


def first_name(tree) -> str:
    return tree_names(tree)[0]


def last_name(tree) -> str:
    return tree_names(tree)[-1]


def fusions(tree) -> list[tuple[str, dict]]:
    """``(fusion name, config)`` of every Fuse in the tree."""
    if tree is None or tree[0] == "name":
        return []
    out = [(tree[1], dict(tree[2]))] if tree[0] == "fuse" else []
    return out + [f for k in tree[-1] for f in fusions(k)]


def describe(tree) -> str:
    if tree is None:
        return "-"
    if tree[0] == "name":
        return tree[1]
    label = {"stack": "Stack", "fuse": "Fuse", "average": "Average", "batch_split": "BatchSplit",
             "parallel": "Parallel"}[tree[0]]
    return f"{label}({', '.join('-' if k is None else describe(k) for k in tree[-1])})"


class _Composition(nn.Module):
    """Holds references (not submodules: their parameters stay under their own adapter) to the
    adapter modules and fusion layers it calls."""

    def __init__(self, tree, modules: dict[str, nn.Module], fusion_layers: dict[str, nn.Module]):
        super().__init__()
        self.tree = tree
        object.__setattr__(self, "_mods", dict(modules))
        object.__setattr__(self, "_fusions", dict(fusion_layers))

    mergeable = False
    merge_refusal = "composed site (its adapters are combined by a composition block); deactivate the composition to merge"

    def __deepcopy__(self, memo):
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def extra_repr(self) -> str:
        return describe(self.tree)


def _rows(t: Tensor, a: int, b: int) -> Tensor:
    return t[a:b]


def _check_batch(sizes, batch: int) -> None:
    if sum(sizes) != batch:
        raise ValueError(f"BatchSplit batch_sizes {list(sizes)} sum to {sum(sizes)}, but the batch has {batch} rows; "
                         "call with a batch of that size or change batch_sizes")


class ResidualComposition(_Composition):
    """``(h, r, ln_w, ln_b) → out`` for a tree of bottleneck-style adapters (``pre``/``core``/``post``)."""

    def forward(self, h: Tensor, residual: Tensor, ln_weight=None, ln_bias=None) -> Tensor:
        ln = (ln_weight, ln_bias)
        state = (h, residual, residual, None, None)  # hidden, input, adapter residual, up, last
        hidden, inp, _res, _up, last = self._eval(self.tree, state, ln)
        return self._mods[last].post(hidden, h, inp, ln_weight, ln_bias)

    def _pre(self, name: str, state, ln, query_before_ln: bool = False):
        hidden, inp, _res, up, last = state
        x, query, res = self._mods[name].pre(hidden, inp, *ln, query_before_ln=query_before_ln)
        return (x, inp, res, up, last), query

    def _single(self, name: str, state):
        hidden, inp, res, _up, _last = state
        out, up = self._mods[name].core(hidden, res)
        return (out, inp, res, up, name)

    def _eval(self, tree, state, ln):
        kind = tree[0]
        if kind == "name":  # a lone adapter is Stack(name): pre, then the adapter
            state, _ = self._pre(tree[1], state, ln)
            return self._single(tree[1], state)
        kids = tree[-1]
        if kind == "stack":
            for k in kids:
                if k[0] == "name":
                    state, _ = self._pre(k[1], state, ln)
                    state = self._single(k[1], state)
                else:
                    state = self._eval_block(k, state, ln)
            return state
        return self._eval_block(tree, state, ln)

    def _child(self, k, state, ln):
        """A child of a non-Stack block: a name runs without its own ``pre`` (the block ran one)."""
        return self._single(k[1], state) if k[0] == "name" else self._eval_block(k, state, ln)

    def _eval_block(self, tree, state, ln):
        kind, kids = tree[0], tree[-1]
        if kind == "stack":
            return self._eval(tree, state, ln)
        if kind == "fuse":
            cfg = dict(tree[2])
            last = last_name(tree)
            state, query = self._pre(last, state, ln, query_before_ln=cfg["query_before_ln"])
            outs = [self._child(k, state, ln) for k in kids]
            ups = torch.stack([o[3] for o in outs]).permute(1, 2, 0, 3)
            hidden = self._fusions[tree[1]](query, ups, ups, state[2])
            return (hidden, state[1], state[2], state[3], last)
        if kind == "average":
            state, _ = self._pre(first_name(tree), state, ln)
            outs = [self._child(k, state, ln) for k in kids]
            hidden = sum(w * o[0] for w, o in zip(tree[1], outs))
            return (hidden, state[1], state[2], outs[0][3], outs[-1][4])
        if kind in ("batch_split", "parallel"):
            batch = state[0].shape[0]
            if kind == "batch_split":
                _check_batch(tree[1], batch)
                bounds, a = [], 0
                for s in tree[1]:
                    bounds.append((a, a + s))
                    a += s
            else:
                n = tree[1]
                if batch % n:
                    raise ValueError(f"Parallel with {n} channels needs a batch divisible by {n}, got {batch}")
                per = batch // n
                bounds = [(i * per, (i + 1) * per) for i in range(n)]
            present = [k for k in kids if k is not None]
            state, _ = self._pre(first_name(("stack", tuple(present))), state, ln)
            outs, last = [], state[4]
            for k, (a, b) in zip(kids, bounds):
                part = tuple(None if t is None or not isinstance(t, Tensor) else _rows(t, a, b) for t in state[:4]) \
                    + (state[4],)
                if k is None:
                    outs.append(part)
                    continue
                o = self._child(k, part, ln)
                outs.append(o)
                last = o[4] or last
            cat = [torch.cat([o[i] for o in outs], 0) for i in range(3)]
            up = None if any(o[3] is None for o in outs) else torch.cat([o[3] for o in outs], 0)
            return (cat[0], cat[1], cat[2], up, last)
        raise TypeError(f"unknown composition node {kind!r}")


class LinearComposition(_Composition):
    """``(x, y, W, b) → y'`` for a tree of linear-site adapters (see the module docstring)."""

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias=None) -> Tensor:
        return self._eval(self.tree, x, y, weight, bias)

    def _eval(self, tree, x, y, w, b):
        kind = tree[0]
        if kind == "name":
            return self._mods[tree[1]](x, y, w, b)
        kids = tree[-1]
        if kind == "stack":
            for k in kids:
                y = self._eval(k, x, y, w, b)
            return y
        if kind == "average":
            return sum(wt * self._eval(k, x, y, w, b) for wt, k in zip(tree[1], kids))
        if kind == "fuse":
            deltas = torch.stack([self._eval(k, x, y, w, b) - y for k in kids], dim=-2)
            return self._fusions[tree[1]](y, deltas, deltas, y)
        if kind in ("batch_split", "parallel"):
            batch = y.shape[0]
            if kind == "batch_split":
                _check_batch(tree[1], batch)
                sizes = list(tree[1])
            else:
                if batch % tree[1]:
                    raise ValueError(f"Parallel with {tree[1]} channels needs a batch divisible by {tree[1]}, "
                                     f"got {batch}")
                sizes = [batch // tree[1]] * tree[1]
            outs, a = [], 0
            for k, s in zip(kids, sizes):
                xs, ys = x[a:a + s], y[a:a + s]
                outs.append(ys if k is None else self._eval(k, xs, ys, w, b))
                a += s
            return torch.cat(outs, 0)
        raise TypeError(f"unknown composition node {kind!r}")


__all__ = ["LinearComposition", "ResidualComposition", "describe", "first_name", "fusions", "last_name", "prune",
           "tree_names"]
