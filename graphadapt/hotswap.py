"""Swap slots: replace one adapter's weights by another's in place, without changing the graph.

An adapter's modules become a *slot* (:func:`prepare_slots`): each module is put in its slot form through the
swap slot protocol (:class:`graphadapt.passes.modules.SwappableModule`) — constants that differ between
adapters (LoRA's ``alpha/r``, IA3's ``alpha``, a bottleneck's constant ``scaling``) are folded into its tensors
and rank-like sizes are zero-padded to ``max_rank`` (exact: padded directions add ``0``). The model computes
the same function (up to the rounding of the folded scale). :func:`hot_swap` then copies another adapter's
slot-form tensors into the slot's parameters (same storage, same shapes): the graph and every tensor's
identity, shape and dtype stay, so a ``torch.compile``-d model does not recompile.

Nothing here names a method: modules answer ``swap_rank()``, ``swap_signature()``, ``swap_tensors(rank)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .errors import GraphAdaptError
from .passes.modules import swap_refusal
from .vocab import adapter_prefix

__all__ = ["is_slot", "prepare_slots", "hot_swap", "slot_modules", "slot_state", "source_modules"]


def slot_modules(model, name: str, error=GraphAdaptError) -> dict[str, nn.Module]:
    """``{site key: module}`` of adapter ``name`` (site key: the module path under ``adapters.<name>.``)."""
    if name not in getattr(model, "spec").adapters:
        raise error(f"unknown adapter {name!r}; this model has {list(model.spec.adapters)}")
    prefix = adapter_prefix(name)
    mods: dict[str, nn.Module] = {}
    for r in model.adapter_records:
        if r.adapter == name and r.target.startswith(prefix):
            mods.setdefault(r.target[len(prefix):], model.get_submodule(r.target))
    if not mods:
        raise error(f"adapter {name!r} has no modules in this model's graph")
    for key, mod in mods.items():
        why = swap_refusal(mod)
        if why:
            raise error(f"adapter {name!r} cannot be swapped at {key}: {why}. Only methods whose modules offer a "
                        "swap slot form can be swapped (docs/deployment.md lists the built-in ones)")
    return mods


def _rank_of(mods: Mapping[str, nn.Module]) -> int | None:
    ranks = [r for r in (m.swap_rank() for m in mods.values()) if r is not None]
    return max(ranks) if ranks else None


def prepare_slots(model, max_rank: int | None = None, names=None, error=GraphAdaptError) -> dict[str, int | None]:
    """Put adapters ``names`` (default: all) in slot form, ranks padded to ``max_rank`` (default: each
    adapter's largest rank). Returns ``{adapter: slot rank}``. Checked for every module before any changes."""
    names = list(model.spec.adapters) if names is None else ([names] if isinstance(names, str) else list(names))
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise error(f"max_rank must be a positive int (or None: each adapter's own largest rank), got {max_rank!r}")
    plan: dict[str, tuple[dict[str, nn.Module], int | None]] = {}
    for name in names:
        mods = slot_modules(model, name, error)
        own = _rank_of(mods)
        if max_rank is not None and own is not None and own > max_rank:
            raise error(f"adapter {name!r} has rank {own}, more than max_rank={max_rank}; raise max_rank")
        plan[name] = (mods, own if max_rank is None else max_rank)
    for name, (mods, rank) in plan.items():
        for mod in mods.values():
            mod.make_swap_slot_(rank if mod.swap_rank() is not None else None)
    return {name: (rank if _rank_of(mods) is not None else None) for name, (mods, rank) in plan.items()}


def is_slot(mod: nn.Module) -> bool:
    """Whether ``mod`` is in slot form: its slot-form tensors at its own rank are exactly its parameters."""
    tensors = mod.swap_tensors(mod.swap_rank())
    params = dict(mod.named_parameters())
    return set(tensors) == set(params) and all(
        params[k].shape == t.shape and torch.equal(params[k].detach(), t) for k, t in tensors.items())


def slot_state(slot: Mapping[str, nn.Module], source: Mapping[str, nn.Module], what: str,
               error=GraphAdaptError) -> dict[str, dict[str, torch.Tensor]]:
    """``{site key: {param: tensor}}``: ``source``'s tensors in the slot form of ``slot`` (same sites, same
    signatures, ranks padded to the slot's). Raises ``error`` naming the first mismatch."""
    missing, extra = sorted(set(slot) - set(source)), sorted(set(source) - set(slot))
    if missing or extra:
        raise error(f"{what} is not at the slot's sites: {len(missing)} slot site(s) it lacks (e.g. {missing[:2]}), "
                    f"{len(extra)} site(s) the slot lacks (e.g. {extra[:2]}); swap only adapters trained on the same "
                    "targets (and layers) of the same base model")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, mod in slot.items():
        src = source[key]
        why = swap_refusal(src)
        if why:
            raise error(f"{what} cannot be swapped in at {key}: {why}")
        if src.swap_signature() != mod.swap_signature():
            raise error(f"{what} differs from the slot at {key} in more than rank and scaling "
                        f"({src.swap_signature()} vs the slot's {mod.swap_signature()}); swap only adapters of the "
                        "same method and options")
        rank = mod.swap_rank()
        if rank is not None and src.swap_rank() > rank:
            raise error(f"{what} has rank {src.swap_rank()} at {key}, more than the slot's rank {rank}; prepare "
                        f"the slot with a larger max_rank (prepare_hot_swap(max_rank={src.swap_rank()}) or "
                        "export_onnx(..., swappable=True, max_rank=...))")
        tensors = src.swap_tensors(rank)
        params = dict(mod.named_parameters())
        if set(tensors) != set(params) or any(params[k].shape != t.shape for k, t in tensors.items()):
            raise error(f"{what} does not fit the slot at {key}: tensors "
                        f"{ {k: tuple(t.shape) for k, t in tensors.items()} } vs the slot's "
                        f"{ {k: tuple(p.shape) for k, p in params.items()} }")
        out[key] = tensors
    return out


def source_modules(source: Any, adapter: str | None, recapture: Callable | None = None, base=None,
                   error=GraphAdaptError) -> tuple[dict[str, nn.Module], str]:
    """(``{site key: module}``, description) of the adapter to swap in: ``source`` is an adapted model (its
    adapter ``adapter``; default: its only one) or a checkpoint directory (graphadapt ``save_adapters`` /
    ``save_pretrained``, or PEFT), applied to ``base`` with ``recapture`` (``graphadapt.apply``)."""
    if isinstance(source, (str, os.PathLike)):
        if recapture is None or base is None:
            raise error("loading a checkpoint directory needs the model's recapture service and source model; "
                        "load it with graphadapt.load / graphadapt.import_peft and pass the adapted model")
        source = load_checkpoint(base, source, recapture, error)
    if not hasattr(source, "adapter_records"):
        raise error(f"hot_swap takes an adapted model or a checkpoint directory, got {type(source).__name__}")
    names = list(source.spec.adapters)
    if adapter is None:
        if len(names) != 1:
            raise error(f"the source model has adapters {names}; name the one to swap in (adapter=...)")
        adapter = names[0]
    return slot_modules(source, adapter, error), f"adapter {adapter!r}"


def load_checkpoint(base: nn.Module, directory, recapture: Callable, error=GraphAdaptError):
    """An adapted model of ``base`` holding the adapter saved in ``directory`` (graphadapt or PEFT format)."""
    from pathlib import Path

    from .checkpoints.adapters import SPEC_FILE, load_adapter_weights, read_spec
    from .spec import Spec

    d = Path(directory)
    if (d / SPEC_FILE).exists():
        model = recapture(base, read_spec(d))
        load_adapter_weights(model, d)
        return model
    if (d / "adapter_config.json").exists():
        from .checkpoints.peft import read_peft

        spec, fill, modules = read_peft(base, d, "default", ignore_modules_to_save=True)
        model = recapture(base, Spec({"default": spec}))
        fill(model)
        return model
    raise error(f"{directory} is neither a graphadapt adapter checkpoint ({SPEC_FILE}) nor a PEFT one "
                "(adapter_config.json)")


@torch.no_grad()
def hot_swap(model, slot: str, source: Any, adapter: str | None = None, recapture: Callable | None = None,
             base=None, error=GraphAdaptError) -> dict[str, int]:
    """Copy the adapter in ``source`` into slot ``slot`` of ``model``, in place (see the module docstring).
    Everything is checked before anything is copied: a refused swap leaves the model untouched.
    Returns ``{"sites": n, "tensors": m}``."""
    mods = slot_modules(model, slot, error)
    bad = [k for k, m in mods.items() if not is_slot(m)]
    if bad:
        raise error(f"adapter {slot!r} is not a swap slot yet (e.g. at {bad[0]}: its scaling is not folded into its "
                    "tensors); call prepare_hot_swap(max_rank=...) once, before torch.compile")
    if isinstance(source, Mapping):
        state = _from_mapping(mods, source, slot, error)
    else:
        src, what = source_modules(source, adapter, recapture, base, error)
        state = slot_state(mods, src, what, error)
    n = 0
    for key, tensors in state.items():
        params = dict(mods[key].named_parameters())
        for k, t in tensors.items():
            params[k].copy_(t.to(device=params[k].device, dtype=params[k].dtype))
            n += 1
    return {"sites": len(state), "tensors": n}


def _from_mapping(mods, state: Mapping, slot: str, error) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<site key>.<param>": tensor}`` (or with the ``adapters.<slot>.`` prefix), already in slot form."""
    prefix = adapter_prefix(slot)
    flat = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, mod in mods.items():
        for k, p in mod.named_parameters():
            name = f"{key}.{k}"
            if name not in flat:
                raise error(f"the state has no tensor {name!r} for slot {slot!r} (it needs every slot tensor, e.g. "
                            f"{[f'{key}.{n}' for n, _ in mod.named_parameters()]})")
            t = flat.pop(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                raise error(f"{name}: expected a tensor of shape {tuple(p.shape)}, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not torch.isfinite(t).all():
                raise error(f"{name} holds non-finite values")
            out.setdefault(key, {})[k] = t
    if flat:
        raise error(f"the state has tensors slot {slot!r} lacks: {sorted(flat)[:3]}")
    return out
