"""The insertion plan: what ``apply`` will do, as data, before any graph is touched.

    spec + StructureMap ──build_plan──▶ Plan
        adapters:     adapter → method plugin → sites (+ seed), in execution order
        combinations: site → the adapters that share it and how they combine ("chain")

Every site of every adapter is resolved first (a target that matches nothing is a
:class:`SpecError` naming what exists), and every site shared by several adapters gets an
explicit combination entry: with an active composition block (``Spec.active = Stack(…)``,
``Fuse(…)``, …) the block pruned to the adapters at the site (``"compose"``); otherwise the
methods' own ``combine`` policy (``"chain"``). Adapters whose method declares no policy for
sharing (``combine=None``, e.g. two bottleneck adapters at one residual point) and no block
saying how they combine are refused here, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .composition.insert import replicate_inputs
from .composition.route import ROUTE_INPUT, sync_route_state
from .composition.site import Leaf, RouteNode, Tree, describe, prune
from .errors import SpecError
from .methods import Method, get_method
from .passes import InsertContext, run_pass
from .sites import get_site_kind
from .sites.compose import insert_compositions
from .spec import MethodSpec, Spec
from .structure.types import StructureMap
from .vocab import CombinePolicy, SiteKind


class PlanMode(StrEnum):
    """How the adapters at one shared site combine (:class:`Combination`)."""

    CHAIN = "chain"
    """Each module reads the previous one's output, in plan order (the methods' ``chain`` policy)."""
    COMPOSE = "compose"
    """The active composition block, pruned to the site, is evaluated by one composition module."""
    SELECT = "select"
    """Adapters that cannot share a site, at most one active: only the first is wired, the others dormant."""


@dataclass(frozen=True)
class PlannedAdapter:
    """One adapter: its method plugin, spec, seed and resolved sites."""

    name: str
    method: Method
    spec: MethodSpec
    seed: int
    sites: tuple

    @property
    def site_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.method.site_key(s) for s in self.sites))

    @property
    def physical(self) -> tuple:
        """Every module position of this adapter (a union's members' sites), one per (kind, key)."""
        seen: dict = {}
        for s in self.sites:
            for p in self.method.physical_sites(self.name, s):
                seen.setdefault((p.kind, p.key), p)
        return tuple(seen.values())


@dataclass(frozen=True)
class Combination:
    """Several adapters at one site, combined by ``mode``.

    ``"chain"``: each adapter's module reads the previous one's output, in ``adapters`` order (LoRA
    deltas add up; IA3 scales what came before; DoRA rescales it, as PEFT does for several active
    adapters). ``"compose"``: the active composition block, pruned to the adapters at this site
    (``tree``, see :mod:`graphadapt.composition.site`), is evaluated by one composition module.
    ``"select"``: adapters that cannot share a site, of which at most one is active: only
    ``adapters[0]`` is wired, the others are built but dormant.
    """

    site: str
    kind: SiteKind
    adapters: tuple[str, ...]
    mode: PlanMode
    tree: Tree | None = None
    owners: tuple[str, ...] = ()
    """Module owner of each adapter here (``adapters.<owner>.<site>``): the adapter, or a union's member."""

    def owner(self, adapter: str) -> str:
        return dict(zip(self.adapters, self.owners or self.adapters))[adapter]


@dataclass(frozen=True)
class Plan:
    adapters: tuple[PlannedAdapter, ...]
    combinations: tuple[Combination, ...]
    parallel_channels: int = 1
    """> 1 when the composition holds a ``Parallel``: batched inputs are replicated this many times."""

    def __str__(self) -> str:
        lines = [f"{len(self.adapters)} adapter(s):"]
        for a in self.adapters:
            lines.append(f"  {a.name}: {a.method.name} at {len(a.site_keys)} {a.method.site_kind} site(s), seed {a.seed}")
        if self.combinations:
            lines.append(f"{len(self.combinations)} shared site(s):")
            lines += [f"  {c.site}: " + _describe_combination(c) for c in self.combinations]
        if self.parallel_channels > 1:
            lines.append(f"batched inputs replicated x{self.parallel_channels} (Parallel)")
        return "\n".join(lines)

    @property
    def composed(self) -> tuple[Combination, ...]:
        return tuple(c for c in self.combinations if c.mode == PlanMode.COMPOSE)

    def site(self, kind: str, key: str):
        """The site object (``LinearSite`` / ``ResidualTarget``) of ``(kind, key)``."""
        for a in self.adapters:
            for p in a.physical:
                if (p.kind, p.key) == (kind, key):
                    return p.site
        raise KeyError((kind, key))


def _describe_combination(c: Combination) -> str:
    if c.mode == PlanMode.CHAIN:
        return f"{' → '.join(c.adapters)} (chain)"
    if c.mode == PlanMode.SELECT:
        return f"{c.adapters[0]} wired, other adapters there dormant (select)"
    return f"{describe(c.tree)} (compose)"


def build_plan(sm: StructureMap, spec: Spec) -> Plan:
    """Resolve every adapter's sites and how adapters sharing a site combine (SpecError on conflicts)."""
    planned = []
    for name, mspec in spec.adapters.items():
        method = get_method(mspec)
        sites = tuple(method.select(sm, mspec, name))
        planned.append(PlannedAdapter(name, method, mspec, spec.effective_seed(name), sites))
    # passes that only add nodes (linear sites) run first, in spec order (sorted is stable); passes that
    # replace a node (residual points) run after, rewiring every consumer to the adapter
    planned.sort(key=lambda a: a.method.phase)

    at: dict[tuple[str, str], list] = {}
    for a in planned:
        for p in a.physical:
            at.setdefault((p.kind, p.key), []).append((a, p))
    block = spec.composition
    combos = []
    for (kind, key), here in at.items():
        users = [a for a, _ in here]
        owners = tuple(p.owner for _, p in here)
        names = tuple(u.name for u in users)
        tree = None if block is None else prune(block, names)
        composed = tree is not None and (len(users) > 1 or not isinstance(tree, Leaf))
        site_kind = get_site_kind(kind)
        if composed and not site_kind.composable:
            # a lone adapter at a kind without composition semantics applies as it is inside any block
            composed = site_kind.refuse_composition(here[0][1].site, key, names, tree, describe)
        if composed:
            combos.append(Combination(key, kind, names, PlanMode.COMPOSE, tree, owners))
            continue
        if len(users) < 2:
            continue
        modes = {p.combine for _, p in here}
        exclusive = CombinePolicy.EXCLUSIVE in modes
        live = [(u, p) for u, p in here if u.name in spec.active_names]
        if exclusive and spec.active is not None and len(live) <= 1:
            # dormant adapters share the site with (at most) one active one: wire only that one
            pick = live or here[:1]
            combos.append(Combination(key, kind, tuple(u.name for u, _ in pick), PlanMode.SELECT, None,
                                      tuple(p.owner for _, p in pick)))
            continue
        if exclusive or len(modes) != 1:
            first, second = users[0], users[1]
            raise SpecError(
                f"adapters {first.name!r} ({first.method.name}) and {second.name!r} ({second.method.name}) both "
                f"put an adapter at {key}; at one {kind} site they need a composition block saying how they "
                f"combine: Spec(..., active=Stack/Fuse/Parallel/BatchSplit/Average(...)) (AdapterHub's "
                "Stack/Parallel).", field="adapters")
        combos.append(Combination(key, kind, names, PlanMode(modes.pop()), None, owners))
    return Plan(tuple(planned), tuple(combos), block.parallel_channels if block is not None else 1)


def execute_plan(gm, plan: Plan, dropout: float = 0.0, base_seed: int = 0) -> list:
    """Run the plan's insertion passes on ``gm`` (modules already present are reused) and wire the
    composed sites; returns the :class:`~graphadapt.passes.AdapterRecord`\\ s."""
    ctx = InsertContext(attach_only={c.site: frozenset() if c.mode == PlanMode.COMPOSE else frozenset(c.owners or c.adapters)
                                     for c in plan.combinations if c.mode in (PlanMode.COMPOSE, PlanMode.SELECT)})
    records = []
    for a in plan.adapters:
        res = run_pass(f"insert_{a.method.name}[{a.name}]", a.method.insert, gm, ctx, a.name, a.spec,
                       list(a.sites), a.seed)
        records.extend(res.records)
    if plan.composed:
        sites = {(c.kind, c.site): plan.site(c.kind, c.site) for c in plan.composed}
        res = run_pass("insert_compositions", insert_compositions, gm, ctx, plan.composed, sites, base_seed, dropout)
        records.extend(res.records)
    if plan.parallel_channels > 1:
        run_pass("replicate_inputs", replicate_inputs, gm, plan.parallel_channels)
    routed = [c for c in plan.composed if isinstance(c.tree, RouteNode)]
    sync_route_state(gm, bool(routed), len(routed[0].tree.children) if routed else 0,
                     routed[0].tree.ids_input if routed else ROUTE_INPUT)
    return records


__all__ = ["Combination", "Plan", "PlanMode", "PlannedAdapter", "build_plan", "execute_plan"]
