"""Adapter arithmetic as a service: combine adapters into a new one, or turn any foldable adapter into a low-rank one.

* :func:`add_weighted_adapter` — PEFT's ``add_weighted_adapter``: the adapters' method plugin combines them
  (:meth:`graphadapt.methods.base.Method.weighted_adapter`; LoRA: every PEFT combination type, IA3: linear);
* :func:`to_low_rank` — the change an adapter makes to each weight it folds into (the merge protocol: ``ΔW = fold(W)
  − W``, and ``Δb``), approximated at a chosen rank by truncated SVD and written as a new adapter of the one method
  that represents weight deltas (:attr:`~graphadapt.methods.base.Method.represents_weight_deltas`: LoRA), so
  runtimes that serve only that method can serve it.

Either way the result is a normal adapter of the model (trainable, saveable, mergeable), added inactive as
``add_adapter`` adds one. Nothing here names a method: the plugins own the math.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch

from .errors import GraphAdaptError, SpecError
from .methods.registry import get_method, registered
from .vocab import SiteKind


def _site_order(model):
    order = {n: i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}

    def key(record):
        return order.get(record.weight, len(order)), record.site
    return key


def _check_new_name(model, name) -> None:
    if not isinstance(name, str) or not name:
        raise GraphAdaptError(f"the new adapter's name must be a non-empty string, got {name!r}")
    if name in model.spec.adapters or name in model.spec.module_owners:
        raise GraphAdaptError(f"adapter {name!r} already exists; this model has {list(model.spec.adapters)}: "
                              "choose a new name")
    if model.is_merged:
        raise GraphAdaptError("unmerge() before adding an adapter")


def _modules_by_site(model, adapter: str) -> tuple[dict, list]:
    """``{site: module}`` of an adapter (one module per site) and its records, in the base model's module order."""
    records = sorted((r for r in model.adapter_records if r.adapter == adapter), key=_site_order(model))
    mods: dict = {}
    kept = []
    for r in records:
        if r.site not in mods:
            mods[r.site] = model.get_submodule(r.target)
            kept.append(r)
    return mods, kept


def _install(model, name: str, spec, fill, sites: list[str]) -> None:
    model.add_adapter(name, spec)
    try:
        new, _ = _modules_by_site(model, name)
        if set(new) != set(sites):
            raise GraphAdaptError(f"internal: the new adapter {name!r} landed on {sorted(new)}, expected "
                                  f"{sorted(sites)}")
        with torch.no_grad():
            fill(new)
    except BaseException:
        model.delete_adapter(name)   # the sources are still there, so it is never the only adapter
        raise


def add_weighted_adapter(model, adapters: Iterable[str], weights: Iterable[float], adapter_name: str,
                         combination_type: str | None = None, *, svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total", seed: int = 0) -> None:
    """See :meth:`graphadapt.model.AdaptedModel.add_weighted_adapter`."""
    _check_new_name(model, adapter_name)
    if isinstance(adapters, str):
        adapters = [adapters]
    adapters = list(adapters)
    weights = list(weights) if not isinstance(weights, (int, float)) else [weights]
    if not adapters:
        raise GraphAdaptError("add_weighted_adapter needs at least one adapter to combine")
    unknown = [a for a in adapters if a not in model.spec.adapters]
    if unknown:
        raise GraphAdaptError(f"unknown adapter(s) {unknown}; this model has {list(model.spec.adapters)}")
    if len(set(adapters)) != len(adapters):
        raise GraphAdaptError(f"adapters must be distinct, got {adapters}")
    if len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise GraphAdaptError(f"weights must be one finite number per adapter ({len(adapters)}), got {weights!r}")
    methods = {model.spec.adapters[a].method for a in adapters}
    if len(methods) != 1:
        raise SpecError(f"add_weighted_adapter combines adapters of one method, got "
                        f"{ {a: model.spec.adapters[a].method for a in adapters} }; convert them first with "
                        "to_low_rank(...)", field="adapters")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GraphAdaptError(f"seed must be an int (it seeds the random DARE masks), got {seed!r}")
    plugin = get_method(methods.pop())
    sources, order, seen = [], _site_order(model), {}
    for a in adapters:
        mods, records = _modules_by_site(model, a)
        sources.append((a, model.spec.adapters[a], mods))
        for r in records:
            seen.setdefault(r.site, r)
    sites = [r.site for r in sorted(seen.values(), key=order)]
    options = dict(combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                   svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                   majority_sign_method=majority_sign_method, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        spec, fill = plugin.weighted_adapter(sources, [float(w) for w in weights], sites, options)
    _install(model, adapter_name, spec, fill, sites)


def _takes_base(fold) -> bool:
    try:
        return "base_weight" in inspect.signature(fold).parameters
    except (TypeError, ValueError):
        return False


def to_low_rank(model, adapter: str, rank: int, name: str) -> None:
    """See :meth:`graphadapt.model.AdaptedModel.to_low_rank`."""
    _check_new_name(model, name)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SpecError(f"rank must be a positive int, got {rank!r}", field="rank")
    if adapter not in model.spec.adapters:
        raise GraphAdaptError(f"unknown adapter {adapter!r}; this model has {list(model.spec.adapters)}")
    targets = [p for p in registered() if p.represents_weight_deltas]
    if len(targets) != 1:
        raise GraphAdaptError(f"to_low_rank needs exactly one registered method that represents weight deltas, "
                              f"found {[p.name for p in targets]}")
    mods, records = _modules_by_site(model, adapter)
    if not records:
        raise GraphAdaptError(f"adapter {adapter!r} has no modules to convert")
    deltas = {}
    with torch.no_grad():
        for r in records:
            m = mods[r.site]
            if r.kind != SiteKind.LINEAR:
                raise SpecError(f"to_low_rank converts changes of linear-layer weights; {adapter!r} has a module at a "
                                f"{r.kind} site ({r.site}), which does not fold into a weight matrix", field="adapter")
            if not getattr(m, "mergeable", False):
                why = getattr(m, "merge_refusal", None) or "it does not fold into the weights"
                raise SpecError(f"cannot convert {adapter!r} at {r.site}: {why}", field="adapter")
            w = model.get_parameter(r.weight).detach()
            b = model.get_parameter(r.bias).detach() if r.bias is not None else None
            w2, b2 = m.fold(w, b, base_weight=w) if _takes_base(m.fold) else m.fold(w, b)
            if b is None and b2 is not None:
                raise SpecError(f"{adapter!r} at {r.site} creates a bias the layer does not have; it cannot be "
                                "converted", field="adapter")
            deltas[r.site] = (r, w2.float() - w.float(), None if b is None else b2.float() - b.float())
        sites = list(deltas)
        spec, fill = targets[0].from_weight_deltas(deltas, rank, sites, {})
    _install(model, name, spec, fill, sites)


__all__ = ["add_weighted_adapter", "to_low_rank"]
