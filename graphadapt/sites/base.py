"""What a site kind is: one :class:`SiteKindPlugin` per kind of place an adapter module can sit.

A site kind owns everything about *where* that is the same for every method using it:

* **selection** (:meth:`SiteKindPlugin.select`: structure map + the method's spec → site objects) and the
  site's identity for the plan (:meth:`SiteKindPlugin.key`);
* **insertion** (:meth:`SiteKindPlugin.insert`): it calls the method's ``prepare`` hook once (shared
  modules, checks), then the method's ``build`` per site, and does the graph surgery;
* the **node annotation** its pass writes (:class:`~graphadapt.passes.SiteAnnotation` with its
  :class:`~graphadapt.vocab.SiteKind`), the **plan order** (``phase``: passes that only add nodes before
  passes that replace nodes) and the **default combine policy** of adapters sharing a site;
* its **composition semantics** (:meth:`SiteKindPlugin.compose`): how a composition block pruned to the
  site is evaluated and wired there (linear sites and residual points; other kinds refuse blocks).

Methods declare their kind (``Method.site_kind``) and implement that kind's small method protocol
(documented on each kind and in ``graphadapt.methods.base``); they are never probed by attribute name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SpecError
from ..vocab import CombinePolicy, SiteKind

if TYPE_CHECKING:
    import torch.fx as fx
    from torch import nn

    from ..composition.site import Tree
    from ..passes import InsertContext, PassResult
    from ..structure.types import StructureMap


class SiteKindPlugin:
    """Base of site kinds. Subclasses set ``kind``, ``phase`` and implement :meth:`select`, :meth:`key`, :meth:`insert`."""

    kind: ClassVar[SiteKind]
    phase: ClassVar[int] = 0
    """Plan order (ascending): passes that only add nodes (linear sites) before passes that replace nodes."""
    combine: ClassVar[CombinePolicy] = CombinePolicy.EXCLUSIVE
    """How adapters sharing one site combine without a composition block (a method may override it)."""
    composable: ClassVar[bool] = False
    """Whether composition blocks (Stack, Fuse, …) are defined at this kind's sites (:meth:`compose`)."""

    # -- where
    def select(self, sm: StructureMap, spec, adapter: str, method) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement select() (the site-kind plugin contract: docs/architecture.md)")

    def key(self, site) -> str:
        """The site's identity in the plan (and the module's path under ``adapters.<owner>.``)."""
        return site.name

    def physical_kind(self, site) -> SiteKind:
        """The kind a site of this plugin is recorded under (a linear plugin's expert sites say ``expert``)."""
        return self.kind

    # -- insertion
    def insert(self, gm: fx.GraphModule, ctx: InsertContext, adapter: str, method, spec, sites: list,
               seed: int) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must implement insert() (the site-kind plugin contract: docs/architecture.md)")

    # -- composition
    def refuse_composition(self, site, key: str, names: tuple[str, ...], tree: Tree, describe) -> bool:
        """Called by the plan when a block covers ``names`` at a site of a non-composable kind. Raise
        :class:`SpecError` to refuse; return False to apply a lone adapter as it is (inside any block)."""
        from ..composition.site import RouteNode

        if isinstance(tree, RouteNode):  # applied as it is, it would run on every row, whatever its id
            raise SpecError(f"{tree.label} routes adapters at linear sites and residual points only; {list(names)} "
                            f"sit at the {self.kind} site {key} — leave them out of the {tree.label}", field="active")
        if len(names) > 1:
            raise SpecError(f"adapters {list(names)} share the {self.kind} site {key}; composition blocks are "
                            f"defined at linear sites and residual points only, not at {self.kind} sites",
                            field="active")
        return False

    def compose(self, gm: fx.GraphModule, ctx: InsertContext, target: str, site, tree: Tree,
                modules: dict[str, nn.Module], fusion_layer) -> tuple[Any, Any]:
        """Wire ``call_module(target)`` evaluating ``tree`` over ``modules`` at ``site``; ``fusion_layer(name,
        config, width, ref)`` gives the fusion layer of a Fuse. Returns ``(layer, role)`` for the record."""
        raise SpecError(f"composition blocks are not defined at {self.kind} sites", field="active")

    def __repr__(self) -> str:
        return f"<site kind {str(self.kind)!r}: {type(self).__qualname__}>"


_KINDS: dict[str, SiteKindPlugin] = {}


def register_site_kind(plugin: type[SiteKindPlugin] | SiteKindPlugin):
    """Register a site kind (class decorator, or call with a class/instance); a new kind (e.g. hidden states
    at chosen positions, for ReFT-like methods) is one more plugin."""
    inst = plugin() if isinstance(plugin, type) else plugin
    _KINDS[str(inst.kind)] = inst
    return plugin


def get_site_kind(kind: SiteKind | str) -> SiteKindPlugin:
    """The plugin of ``kind`` (SpecError naming the registered kinds)."""
    try:
        return _KINDS[str(kind)]
    except KeyError:
        raise SpecError(f"site kind {str(kind)!r} has no registered plugin; registered: {sorted(_KINDS)}",
                        field="method") from None


def site_kinds() -> tuple[SiteKindPlugin, ...]:
    return tuple(_KINDS.values())


__all__ = ["SiteKindPlugin", "get_site_kind", "register_site_kind", "site_kinds"]
