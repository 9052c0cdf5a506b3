"""Fold mergeable adapters into the base weights.

before: ``y' = call_module(adapter)(x, y, W, b)`` after ``y = op(x, W, b)``
after:  ``y = op(x, W', b')`` with ``(W', b') = adapter.fold(W, b)``; the call is gone, so the
        merged graph has exactly the base graph's operators.

The pass asks each module for its fold (``mergeable`` / ``fold(W, b[, base_weight])``), so any
method plugs in without changing it; a module whose forward reads the base weight
(``reads_base_weight``, e.g. DoRA's norm) and stays in the graph blocks folding into that weight. Several adapters on one weight fold in graph order.
Modules that cannot fold (bottleneck, gated LoRA, …) stay in the graph and are reported.

Planning (:func:`plan_merge` with ``compute=False``) only groups the adapters per base
weight (:class:`FoldChain`); :func:`fold_chain` computes one weight's merged value. That
split lets callers fold one weight at a time (streaming ``save_merged``, export in another
dtype) with extra memory bounded by the largest weight.

Speed: a module offering a :class:`~graphadapt.passes.modules.LowRankDelta` (``low_rank_delta()``: plain
LoRA on a whole ``[out, in]`` weight) is folded here as ``W' = W + s · (B @ A)`` in one ``addmm`` (one pass,
one allocation per weight, none in place); other modules use their ``fold``. The
finiteness check (``safe=True``) costs one read of the result (a sum; the exact elementwise
scan runs only when that sum is not finite), instead of an ``isfinite`` tensor per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import MergeError
from ..vocab import SiteKind, adapter_of
from . import PassResult, adapter_call_nodes, annotation_of
from .modules import LowRankDelta, low_rank_delta

FOLDABLE_KINDS = (SiteKind.LINEAR, SiteKind.EXPERT)
"""Site kinds whose modules are called ``(x, y, W, b[, …])`` after ``y = op(x, W, b)``: the ones that can fold."""


def _foldable_site(n: fx.Node) -> bool:
    ann = annotation_of(n)
    return ann is not None and ann.kind in FOLDABLE_KINDS


def _parameter_site(n: fx.Node) -> bool:
    """A module standing in for a base parameter, called ``(p, part) → p'`` (``sites/parameter.py``); it folds by
    ``fold_parameter(p, part) → p'`` (the parameter's new value), and its call is replaced by the read of ``p``."""
    ann = annotation_of(n)
    return ann is not None and ann.kind == SiteKind.PARAMETER


def _parameter_root(n: fx.Node) -> str:
    while n.op != "get_attr":
        n = n.args[0]
    return str(n.target)


@dataclass
class FoldChain:
    """One base weight (and bias) and the adapter modules folded into it, in graph order."""

    weight: str
    bias: str | None
    targets: list[str] = field(default_factory=list)
    part: str | None = None
    """For parameter sites: the name the modules are called with (``"weight"``, ``"bias"``); None for linear sites."""


@dataclass
class MergePlan:
    folded: list[str] = field(default_factory=list)                # module targets
    kept: dict[str, str] = field(default_factory=dict)             # target → reason
    new_values: dict[str, torch.Tensor] = field(default_factory=dict)   # param name → value
    nodes: list[fx.Node] = field(default_factory=list)
    chains: dict[str, FoldChain] = field(default_factory=dict)     # weight name → chain


def adapter_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return adapter_call_nodes(gm)


def _blocked_weights(gm: fx.GraphModule, nodes: list[fx.Node], names) -> dict[str, str]:
    """Weights that must not change because an active module that stays in the graph reads them
    (``reads_base_weight``: DoRA's norm and base term use ``W``): folding anything else into ``W``
    would alter its output."""
    blocked = {}
    for n in nodes:
        if not _foldable_site(n):
            continue
        mod = gm.get_submodule(str(n.target))
        stays = names is not None and adapter_of(str(n.target)) not in names
        reader = getattr(mod, "reads_base_weight", None)
        if reader and getattr(mod, "active", True) and stays:
            label = reader if isinstance(reader, str) else type(mod).__name__
            blocked[n.args[2].target] = (f"an active {label} adapter on the same weight ({n.target}) is not being "
                                         "merged and reads this weight; merge it too, or deactivate it")
    return blocked


def plan_merge(gm: fx.GraphModule, names=None, safe: bool = True, compute: bool = True) -> MergePlan:
    """Which adapters fold into which weights; with ``compute`` also every merged value
    (``plan.new_values``, new tensors; the model is not changed)."""
    plan = MergePlan()
    nodes = adapter_nodes(gm)
    blocked = _blocked_weights(gm, nodes, names)
    folded_targets: set[str] = set()
    for n in nodes:
        target = str(n.target)
        adapter = adapter_of(target)
        if target in folded_targets:  # a module called at several uses of one shared weight folds once
            plan.nodes.append(n)
            continue
        mod = gm.get_submodule(target)
        if names is not None and adapter not in names:
            continue
        if not getattr(mod, "active", True):
            plan.kept[target] = "inactive adapter (activate it to merge it)"
            continue
        if _parameter_site(n) and getattr(mod, "mergeable", False):   # one chain per parameter it stands in for
            qual = _parameter_root(n)
            chain = plan.chains.setdefault(qual, FoldChain(qual, None, part=str(n.args[1])))
            if target not in chain.targets:
                chain.targets.append(target)
            if target not in plan.folded:
                plan.folded.append(target)
            plan.nodes.append(n)
            continue
        if not _foldable_site(n) or not getattr(mod, "mergeable", False):
            why = getattr(mod, "merge_refusal", None) or (
                f"{type(mod).__name__} depends on the input and cannot fold into a weight")
            plan.kept[target] = why
            continue
        w_node, b_node = n.args[2], n.args[3]
        if w_node.target in blocked:
            plan.kept[target] = blocked[w_node.target]
            continue
        chain = plan.chains.setdefault(w_node.target, FoldChain(w_node.target, getattr(b_node, "target", None)))
        chain.targets.append(target)
        plan.folded.append(target)
        folded_targets.add(target)
        plan.nodes.append(n)
    if safe:
        check_factors(gm, plan)
    if compute:
        for chain in plan.chains.values():
            w2, b2 = fold_chain(gm, chain, safe=safe)
            plan.new_values[chain.weight] = w2
            if chain.bias is not None and b2 is not gm.get_parameter(chain.bias):
                plan.new_values[chain.bias] = b2  # unchanged biases (LoRA) are not replaced
    return plan


def check_factors(gm: fx.GraphModule, plan: MergePlan) -> None:
    """Raise :class:`MergeError` before anything is computed if an adapter to fold has a
    non-finite parameter (cheap: adapter parameters are small)."""
    for chain in plan.chains.values():
        for target in chain.targets:
            for pname, p in gm.get_submodule(target).named_parameters():
                if not bool(torch.isfinite(p.detach()).all()):
                    raise MergeError(f"merging {target} gives non-finite values in {chain.weight} (its {pname} "
                                     "is not finite); nothing was changed. Check the adapter weights "
                                     "(or pass safe=False).")


def is_finite(t: torch.Tensor) -> bool:
    """All elements finite; one read (a sum) unless that sum is not finite, then the exact scan."""
    s = t.sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


def _delta_plus(d: LowRankDelta, w: torch.Tensor, out: torch.Tensor | None = None,
                scratch: dict | None = None) -> torch.Tensor:
    """``W + s · (B @ A)``. Without ``out``: a new tensor; with ``out``: written into ``out``
    (which may be ``w`` itself, or a scratch buffer the caller reuses).

    Same dtype and device: one fused ``addmm`` (one pass over ``W``, no temporary; it may
    round ``s · BA + W`` once where PEFT's ``W + (BA)·s`` rounds twice: ≤ 1 ulp apart).
    Otherwise ``B @ A`` (in a buffer reused through ``scratch``) is scaled, cast and added.
    """
    A, B, scale = d.A, d.B, d.scale
    if A.dtype == w.dtype and A.device == w.device and B.dtype == w.dtype:
        if out is None:
            return torch.addmm(w, B, A, alpha=scale)
        if out is w:
            return w.addmm_(B, A, alpha=scale)
        return torch.addmm(w, B, A, alpha=scale, out=out)
    if scratch is not None:
        key = (B.shape[0], A.shape[1], A.dtype, A.device)
        buf = scratch.get(key)
        if buf is None:
            scratch.clear()  # one buffer at a time: bounded by the largest weight
            buf = scratch[key] = torch.empty(key[:2], dtype=A.dtype, device=A.device)
        delta = torch.matmul(B, A, out=buf)
    else:
        delta = B @ A
    delta.mul_(scale)
    if delta.dtype != w.dtype or delta.device != w.device:
        delta = delta.to(dtype=w.dtype, device=w.device)
    if out is not None:
        return out.add_(delta) if out is w else torch.add(w, delta, out=out)
    return delta.add_(w)


def scratch_like(scratch: dict, t: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like ``t`` kept in ``scratch`` across calls (one at a time)."""
    key = ("out", tuple(t.shape), t.dtype, t.device)
    if key not in scratch:
        for k in [k for k in scratch if k[0] == "out"]:
            del scratch[k]
        scratch[key] = torch.empty_like(t)
    return scratch[key]


@torch.no_grad()
def fold_chain(gm: fx.GraphModule, chain: FoldChain, safe: bool = True, *, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, into_weight: bool = False,
               scratch: dict | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merged ``(W', b')`` of one chain (the model's parameters are read, never written): ``W'`` a
    new tensor, ``b'`` new or the unchanged base bias itself.

    ``weight``/``bias`` override the base values read from ``gm`` (e.g. a dtype-converted copy).
    ``into_weight=True`` folds plain LoRA in place into ``weight`` (the caller owns it), with
    ``scratch`` (a dict kept across calls) holding reusable buffers; ``out`` receives a chain
    of plain LoRA instead of a new tensor (a scratch buffer the caller copies from).
    Raises :class:`MergeError` when ``safe`` and a result is not finite.
    """
    base_w = gm.get_parameter(chain.weight).detach() if weight is None else weight
    if chain.part is not None:   # a parameter site: each module gives the parameter's next value
        w = base_w
        for target in chain.targets:
            w = gm.get_submodule(target).fold_parameter(w, chain.part)
        if safe and not is_finite(w):
            raise MergeError(f"merging {', '.join(chain.targets)} gives non-finite values in {chain.weight}; "
                             "nothing was changed. Check the adapter weights (or pass safe=False).")
        return w, None
    base_b = None
    if chain.bias is not None:
        base_b = gm.get_parameter(chain.bias) if bias is None else bias
    w, b = base_w, base_b
    mods = [gm.get_submodule(t) for t in chain.targets]
    deltas = [low_rank_delta(m) for m in mods]
    all_low_rank = all(d is not None for d in deltas)
    # whether ``w`` is ours to write into; a later DoRA/IA3 must still see the unmerged base
    owned = into_weight and all_low_rank
    for target, mod, d in zip(chain.targets, mods, deltas):
        if d is not None:
            dest = w if owned else (out if out is not None and all_low_rank else None)
            w = _delta_plus(d, w, out=dest, scratch=scratch)
            owned = True
            continue
        w, b2 = mod.fold(w, b, base_weight=base_w) if _takes_base(mod) else mod.fold(w, b)
        owned = True
        if chain.bias is None and b2 is not None:
            raise MergeError(f"cannot merge {target}: its fold creates a bias the base layer does not have; "
                             "keep it unmerged (merge(names=...) without it)")
        b = b2
    if safe:
        bad = [nm for nm, t in ((chain.weight, w), (chain.bias, b)) if t is not None and t is not base_b
               and not is_finite(t)]
        if bad:
            raise MergeError(f"merging {', '.join(chain.targets)} gives non-finite values in {bad}; nothing was "
                             "changed. Check the adapter weights (or pass safe=False).")
    return w, b


def _takes_base(mod) -> bool:
    import inspect

    try:
        return "base_weight" in inspect.signature(mod.fold).parameters
    except (TypeError, ValueError):
        return False


def apply_merge(gm: fx.GraphModule, plan: MergePlan) -> PassResult:
    for n in plan.nodes:
        y = n.args[0] if _parameter_site(n) else n.args[1]
        n.replace_all_uses_with(y)
        gm.graph.erase_node(n)
    return PassResult(gm, bool(plan.nodes), {"folded": plan.folded, "kept": plan.kept})
