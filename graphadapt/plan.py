"""The insertion plan: what ``apply`` will do, as data, before any graph is touched.

    spec + StructureMap ──build_plan──▶ Plan
        adapters:     adapter → method plugin → sites (+ seed), in execution order
        combinations: site → the adapters that share it and how they combine ("chain")

Every site of every adapter is resolved first (a target that matches nothing is a
:class:`SpecError` naming what exists), and every site shared by several adapters gets an
explicit combination entry, taken from the methods' ``combine`` policy. Adapters whose
method declares no policy for sharing (``combine=None``, e.g. two bottleneck adapters at
one residual point) are refused here, before anything is built. Composition blocks add
new combination modes on top of this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError
from .methods import Method, get_method
from .spec import MethodSpec, Spec
from .structure.types import StructureMap


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


@dataclass(frozen=True)
class Combination:
    """Several adapters at one site, applied in ``adapters`` order, combined by ``mode``.

    ``"chain"``: each adapter's module reads the previous one's output (LoRA deltas add up;
    IA3 scales what came before; DoRA rescales it, as PEFT does for several active adapters).
    """

    site: str
    kind: str
    adapters: tuple[str, ...]
    mode: str


@dataclass(frozen=True)
class Plan:
    adapters: tuple[PlannedAdapter, ...]
    combinations: tuple[Combination, ...]

    def __str__(self) -> str:
        lines = [f"{len(self.adapters)} adapter(s):"]
        for a in self.adapters:
            lines.append(f"  {a.name}: {a.method.name} at {len(a.site_keys)} {a.method.site_kind} site(s), seed {a.seed}")
        if self.combinations:
            lines.append(f"{len(self.combinations)} shared site(s):")
            lines += [f"  {c.site}: {' → '.join(c.adapters)} ({c.mode})" for c in self.combinations]
        return "\n".join(lines)


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

    at: dict[tuple[str, str], list[PlannedAdapter]] = {}
    for a in planned:
        for key in a.site_keys:
            at.setdefault((a.method.site_kind, key), []).append(a)
    combos = []
    for (kind, key), users in at.items():
        if len(users) < 2:
            continue
        modes = {u.method.combine for u in users}
        if None in modes or len(modes) != 1:
            first, second = users[0], users[1]
            raise SpecError(
                f"adapters {first.name!r} ({first.method.name}) and {second.name!r} ({second.method.name}) both "
                f"put an adapter at {key}; composing them at one {kind} site (AdapterHub's Stack/Parallel) is not "
                "supported yet. Use separate specs, or different layers/positions.", field="adapters")
        combos.append(Combination(key, kind, tuple(u.name for u in users), modes.pop()))
    return Plan(tuple(planned), tuple(combos))


__all__ = ["Combination", "Plan", "PlannedAdapter", "build_plan"]
