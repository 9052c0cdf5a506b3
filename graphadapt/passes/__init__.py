"""Graph passes: graph surgery only. Method modules (``graphadapt.methods``) hold the math.

One contract for every pass (insertion, merge, dtype re-targeting, portability):

* a pass is a function ``fn(gm, *args) -> PassResult``; ``PassResult.modified`` is truthful and
  ``PassResult.records`` lists typed :class:`AdapterRecord`\\ s for the adapter nodes it placed;
* it is run through :func:`run_pass`, which checks the pass's ``requires`` before and its
  ``ensures`` after (always: ``graph.lint()`` and no disconnected adapter node), recompiles, and
  names the pass in a :class:`~graphadapt.errors.PassError` when anything fails;
* state shared between passes travels in an explicit :class:`InsertContext`, never through
  ``gm.meta``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch.fx as fx

from ..errors import GraphAdaptError, PassError
from ..vocab import ADAPTERS, SiteKind


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter module placed at one site of the graph (typed; no dict face).

    ``kind`` is the :class:`~graphadapt.vocab.SiteKind` (``linear``: ``(x, y, W, b) → y'`` after a linear
    op; ``residual``: ``(h, r, ln_w, ln_b) → out`` at a residual point; …). The optional fields are the
    site facts a method, importer or exporter may need; each kind fills its own.
    """

    adapter: str
    method: str
    site: str
    target: str
    kind: SiteKind
    role: str | None = None
    layer: int | None = None
    # linear / expert sites
    weight: str | None = None
    """Qualified name of the base weight the module reads (linear, expert and embedding sites)."""
    bias: str | None = None
    layout: str | None = None
    """``"linear"`` (``[out, in]``) or ``"conv1d"`` (GPT-2's ``[in, out]``)."""
    num_experts: int | None = None
    # residual sites
    placement: str | None = None
    """``"pre_ln"`` / ``"post_ln"``: where the model's norm sits around the residual point."""
    wired: bool = True
    """False when the module is built but another party (a composition, the one active adapter) is wired there."""
    # attention / embedding sites
    index: int | None = None
    form: str | None = None
    source: str | None = None
    at: str | None = None
    grown_inputs: tuple[str, ...] = ()
    # unions and compositions
    member: str | None = None
    """The union member this module belongs to (``adapters.<adapter>.<member>.<site>``)."""
    composition: str | None = None
    """The composition block wired at this site (composition and fusion records)."""

    def to_dict(self) -> dict[str, Any]:
        """The set fields, as JSON-safe values."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or (f.name == "grown_inputs" and not v) or (f.name == "wired" and v):
                continue
            out[f.name] = str(v) if f.name == "kind" else list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class SiteAnnotation:
    """What an insertion pass writes on the adapter node it creates (``node.meta["graphadapt"]``), the only
    thing later passes (chaining, merge) read back from the graph."""

    site: str
    kind: SiteKind


META_KEY = "graphadapt"


def annotate(node: fx.Node, site: str, kind: SiteKind) -> SiteAnnotation:
    """Mark ``node`` as the adapter call at ``site`` of ``kind``."""
    ann = SiteAnnotation(site, SiteKind(kind))
    node.meta[META_KEY] = ann
    return ann


def annotation_of(node: fx.Node) -> SiteAnnotation | None:
    """The :class:`SiteAnnotation` of an adapter call node, or None for any other node."""
    ann = node.meta.get(META_KEY)
    return ann if isinstance(ann, SiteAnnotation) else None


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)
    records: list[AdapterRecord] = field(default_factory=list)


@dataclass
class InsertContext:
    """State shared by the insertion passes of one ``apply``.

    ``replaced`` maps a node a pass removed to the node that now computes its value (a
    residual-point pass replaces ``LN(h + r)`` by the adapter call), so a later pass that
    planned on the original node finds the live one with :meth:`live`.
    """

    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)
    attach_only: dict[str, frozenset] = field(default_factory=dict)
    """Site key → the adapters whose modules may be wired there (absent key: all). At a composed site
    the set is empty: passes build and register the modules but the composition pass wires the site;
    at a site shared by dormant adapters only the active one is wired."""

    def attaches(self, adapter: str, key: str) -> bool:
        allowed = self.attach_only.get(key)
        return allowed is None or adapter in allowed

    def live(self, node: fx.Node) -> fx.Node:
        while node in self.replaced:
            node = self.replaced[node]
        return node


# ------------------------------------------------------------------ checks
def adapter_call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every ``call_module`` node that calls an adapter module."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(ADAPTERS + ".")]


def _check_lint(gm: fx.GraphModule) -> str | None:
    gm.graph.lint()
    return None


def _check_connected(gm: fx.GraphModule) -> str | None:
    dead = [str(n.target) for n in adapter_call_nodes(gm) if not n.users]
    # an adapter nobody reads would train and do nothing: never let that pass silently
    return f"adapter node(s) {dead[:3]} are disconnected from the output" if dead else None


def _check_targets_exist(gm: fx.GraphModule) -> str | None:
    missing = []
    for n in adapter_call_nodes(gm):
        try:
            gm.get_submodule(str(n.target))
        except AttributeError:
            missing.append(str(n.target))
    return f"adapter node(s) call missing modules {missing[:3]}" if missing else None


CHECKS: dict[str, Callable[[fx.GraphModule], str | None]] = {
    "lint": _check_lint,
    "adapters_connected": _check_connected,
    "adapter_modules_exist": _check_targets_exist,
}
ALWAYS = ("lint", "adapters_connected", "adapter_modules_exist")


def run_pass(name: str, fn: Callable[..., PassResult], gm: fx.GraphModule, *args,
             requires: Iterable[str] = (), ensures: Iterable[str] = (), **kwargs) -> PassResult:
    """Run one pass under the contract: check ``requires``, run, recompile, check ``ensures``
    (plus :data:`ALWAYS`); wrap any failure in :class:`PassError` naming the pass."""
    def check(names, when):
        for c in names:
            if c not in CHECKS:
                raise PassError(f"graph pass `{name}` declares unknown check {c!r}; known: {sorted(CHECKS)}")
            why = CHECKS[c](gm)
            if why:
                raise PassError(f"graph pass `{name}`: {when} check {c!r} failed: {why}")

    check(requires, "required")
    try:
        res = fn(gm, *args, **kwargs)
        if not isinstance(res, PassResult):
            raise PassError(f"graph pass `{name}` returned {type(res).__name__}, not PassResult")
        if res.modified:
            res.graph_module.recompile()
        check(tuple(ALWAYS) + tuple(c for c in ensures if c not in ALWAYS), "post-pass")
    except GraphAdaptError:
        raise
    except Exception as e:  # noqa: BLE001 - surface which pass broke the graph
        first = (str(e).strip().splitlines() or [""])[0][:500]
        raise PassError(f"graph pass `{name}` failed: {type(e).__name__}: {first}") from e
    return res


def register_check(name: str, fn: Callable[[fx.GraphModule], str | None]) -> None:
    """Add a named post-condition passes may declare in ``requires``/``ensures``."""
    CHECKS[name] = fn


def submodule_or_none(gm: fx.GraphModule, target: str):
    """The submodule at ``target``, or None when there is none (an adapter module not built yet)."""
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


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


__all__ = ["ALWAYS", "AdapterRecord", "CHECKS", "InsertContext", "META_KEY", "PassResult", "SiteAnnotation",
           "adapter_call_nodes", "annotate", "annotation_of", "erase_dead", "get_attr_node", "register_check", "run_pass",
           "submodule_or_none"]
