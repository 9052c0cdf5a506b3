"""Top-level entry points: ``apply``, ``merge``, ``inspect``."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .capture import capture
from .errors import PassError, SpecError
from .init import isolated_rng
from .model import AdaptedModel, MergeReport
from .passes import run_pass
from .passes.insert_bottleneck import insert_bottleneck, select_residual_sites
from .passes.insert_ia3 import insert_ia3
from .passes.insert_lora import insert_lora
from .passes.select import select_linear_sites
from .spec import Spec, as_spec
from .structure import StructureMap, recognize
from .structure.report import structure_report


def _plan(sm: StructureMap, spec: Spec) -> list[tuple[str, Any, Any]]:
    """Resolve every adapter's sites before anything is built (SpecError on no match)."""
    plan = []
    for name, method in spec.adapters.items():
        if method.method in ("lora", "ia3"):
            plan.append((name, method, select_linear_sites(sm, method, name)))
        elif method.method == "bottleneck":
            plan.append((name, method, select_residual_sites(sm, method, name)))
        else:
            raise SpecError(f"adapter {name!r}: method {method.method!r} has no insertion pass in this "
                            f"version of graphadapt (supported: lora, ia3, bottleneck)", field="method")
    taken: dict[str, str] = {}
    for name, method, sites in plan:
        if method.method != "bottleneck":
            continue
        for t in sites:
            if t.name in taken and taken[t.name] != name:
                raise SpecError(
                    f"adapters {taken[t.name]!r} and {name!r} both put a bottleneck adapter at {t.name}; "
                    "composing bottleneck adapters at one residual point (AdapterHub's Stack/Parallel) is "
                    "not supported yet. Use separate specs, or different layers/positions.", field="adapters")
            taken[t.name] = name
    # linear-site methods first (they only add nodes, in spec order: sorted is stable), while a
    # bottleneck pass replaces the norm/add it sits on, rewiring every consumer to the adapter.
    return sorted(plan, key=lambda item: item[1].method == "bottleneck")


def apply(model: nn.Module, spec: Any, example_inputs: tuple | None = None,
          example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True) -> AdaptedModel:
    """Capture ``model`` and insert the adapters of ``spec``.

    ``spec``: a :class:`Spec`, one method (``LoRA(r=8)``), a dict, or a JSON/YAML path.
    Returns an :class:`AdaptedModel`: base weights frozen (sharing storage with ``model``,
    which is never modified), adapters trainable. Initialisation draws only from generators
    seeded by (seed, adapter name, site): the caller's RNG state is untouched.
    """
    spec = as_spec(spec)
    with isolated_rng():
        gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic, cls=AdaptedModel)
        sm = recognize(gm)
        plan = _plan(sm, spec)
        for p in gm.parameters():
            p.requires_grad_(False)
        records: list[dict] = []
        for name, method, sites in plan:
            seed = spec.effective_seed(name)
            if method.method == "lora":
                run_pass(f"insert_lora[{name}]", insert_lora, gm, name, method, sites, seed, records)
            elif method.method == "ia3":
                run_pass(f"insert_ia3[{name}]", insert_ia3, gm, name, method, sites, seed, records)
            else:
                run_pass(f"insert_bottleneck[{name}]", insert_bottleneck, gm, name, method, sites, seed,
                         records)
        gm.meta.pop("graphadapt_replaced", None)
        dead = [n.target for n in gm.graph.nodes
                if n.op == "call_module" and str(n.target).startswith("adapters.") and not n.users]
        if dead:  # an adapter nobody reads would train and do nothing: never let that pass silently
            raise PassError(f"internal error: adapter node(s) {dead[:3]} are disconnected from the output")
        # adapter modules were created trainable (or deliberately frozen, e.g. learn_phm=False);
        # the base was frozen before insertion, so nothing to flip here
        gm._init_adapted(spec, records, structure_report(sm), model)
        if spec.active is not None:
            gm.set_active(spec.active)
        gm.train(model.training)
    return gm


def merge(adapted: AdaptedModel, names=None, safe: bool = True, strict: bool = False,
          in_place: bool = False, keep_backup: bool = True) -> MergeReport:
    """Fold mergeable adapters into the base weights; see :meth:`AdaptedModel.merge`."""
    return adapted.merge(names, safe=safe, strict=strict, in_place=in_place, keep_backup=keep_backup)


def inspect(model: nn.Module, example_inputs: tuple | None = None,
            example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True) -> dict:
    """Capture and recognise ``model``; return the structure report (see ``graphadapt inspect``)."""
    with isolated_rng():
        gm = capture(model, example_inputs, example_kwargs, dynamic=dynamic)
        return structure_report(recognize(gm))
