"""Graph passes: graph surgery only. Modules (``graphadapt.modules``) hold the math.

A pass returns :class:`PassResult`; :func:`run_pass` lints and recompiles after it
and names the pass when anything fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from ..errors import GraphAdaptError, PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


def run_pass(name: str, fn: Callable[..., PassResult], gm: fx.GraphModule, *args, **kwargs) -> PassResult:
    """Run one pass, then ``graph.lint()`` and ``recompile()``; wrap failures in :class:`PassError`."""
    try:
        res = fn(gm, *args, **kwargs)
        if res.modified:
            res.graph_module.graph.lint()
            res.graph_module.recompile()
    except GraphAdaptError:
        raise
    except Exception as e:  # noqa: BLE001 - surface which pass broke the graph
        first = (str(e).strip().splitlines() or [""])[0][:500]
        raise PassError(f"graph pass `{name}` failed: {type(e).__name__}: {first}") from e
    return res


def get_attr_node(gm: fx.GraphModule, target: str) -> fx.Node:
    """The ``get_attr`` node for ``target``, created at the graph's start if absent."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            return n
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(anchor):
        return gm.graph.get_attr(target)


def erase_dead(gm: fx.GraphModule, roots) -> int:
    """Erase ``roots`` and whatever only they used, if nothing else uses them."""
    erased = 0
    frontier = list(roots)
    while frontier:
        n = frontier.pop()
        if not isinstance(n, fx.Node) or n.graph is not gm.graph or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        erased += 1
        frontier.extend(inputs)
    return erased


__all__ = ["PassResult", "run_pass", "get_attr_node", "erase_dead"]
