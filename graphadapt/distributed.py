"""Sharded training of an adapted model with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

    adapted GraphModule ──cut per recognised layer (torch.fx split_module)──▶ one submodule per layer
        ──each layer's weights read inside its submodule, through the adapted model's own modules──▶
        ──fully_shard(layer) for every layer (+ each adapter module alone with policy="separate"),
          fully_shard(root)──▶ ShardedModel (the FSDP root you train)

Why a cut: FSDP2 gathers a unit's parameters in a forward pre-hook of the unit's module. An adapted
model is one graph that reads every weight through ``get_attr`` (its ``model.layers.3`` modules are
only containers and are never called), so wrapping those containers would never gather anything.
The cut makes each recognised layer a module that is called, and moves the layer's weight reads
into it. The submodules hold the adapted model's own parameter-owning modules (no copies): when
``fully_shard`` replaces a parameter by its shard, the adapted model sees the shard too, and the
full weights are freed (per-rank memory shrinks with the world size). The adapted model is not
callable while sharded (its parameters are ``DTensor`` shards); call the :class:`ShardedModel`.

A bitsandbytes 4-bit/8-bit base (``graphadapt.quantized``) is sharded too: its packed bytes and scales
become frozen parameters of their layer's unit (:func:`_packed_as_parameters`). ``transformers.Trainer``
with ``fsdp_config={"version": 2}`` trains the returned model as it is (accelerate's FSDP2 preparation
leaves an FSDP module alone); docs/scale.md has the recipe and what is tested.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from .checkpointing import node_layers
from .errors import GraphAdaptError
from .model import AdaptedModel
from .quantized import Packed4bitLinear, Packed8bitLinear
from .signatures import _layer_paths

__all__ = ["POLICIES", "ShardedModel", "adapter_state_dict", "full_adapter_state", "load_dcp_adapters",
           "save_sharded_adapters", "shard"]

#: ``"layer"`` (default): one FSDP unit per recognised layer holding its frozen base weights and its
#: adapters; ``"separate"``: each adapter module is a unit of its own inside its layer's base unit
#: (PEFT's ``fsdp_auto_wrap_policy``).
POLICIES = ("layer", "separate")


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, field = target.rpartition(".")
    return (root.get_submodule(path) if path else root), field


def _layer_split(adapted: AdaptedModel) -> tuple[fx.GraphModule, list[str]]:
    """``split_module`` of the graph by layer; returns the split and the names of its layer submodules."""
    paths = _layer_paths(adapted)
    if not paths:
        raise GraphAdaptError("sharding per layer needs recognised transformer layers; `graphadapt inspect` shows "
                              "none in this model (wrap the whole model with torch's fully_shard instead)")
    if len(set(paths)) != len(paths):
        raise GraphAdaptError(f"sharding per layer needs one module per layer; this model's layers share module "
                              f"paths {paths} (e.g. ALBERT's shared layer)")
    labels = node_layers(adapted, paths)
    segment: dict[fx.Node, int] = {}
    kinds: dict[int, Any] = {}
    current, seg = object(), -1
    for n in adapted.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        lab = labels.get(n)
        if lab != current:
            current, seg = lab, seg + 1
            kinds[seg] = lab
        segment[n] = seg
    split = split_module(adapted, adapted, lambda n: segment[n], keep_original_order=True)
    split.graph._codegen = adapted.graph._codegen  # pytree in/out (ModelOutput), as the source returns
    layer_subs = [f"submod_{s}" for s, lab in kinds.items() if lab is not None]
    return split, layer_subs


def _rehome(split: fx.GraphModule, adapted: AdaptedModel, layer_subs: list[str]) -> None:
    """Make every weight read go through the adapted model's own modules, inside its layer's submodule.

    ``split_module`` reads weights in the top graph (``get_attr``) into fresh container modules and passes
    them to the submodules as inputs. A weight read only by one layer submodule moves into it; every read
    is retargeted to ``_owner<i>.<field>`` where ``_owner<i>`` is the adapted model's own module (shared)."""
    graph = split.graph
    calls = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in layer_subs}
    reads = [n for n in graph.nodes if n.op == "get_attr"]
    # which unit reads each owner: a module read by two units (tied weights) stays with the root
    unit_of: dict[int, set[str]] = {}
    for n in reads:
        owner, _ = _owner(adapted, n.target)
        if owner is adapted:
            continue  # the graph's own constants: not parameters of a module
        units = {u.target if u.target in calls else "" for u in n.users} if n.users else {""}
        unit_of.setdefault(id(owner), set()).update(units)

    def slot(n: fx.Node) -> int | None:  # the argument position of a read in its one layer call
        (unit,) = unit_of[id(_owner(adapted, n.target)[0])]
        call = calls[unit]
        idx = [k for k, a in enumerate(call.args) if a is n]
        return idx[0] if len(idx) == 1 and not call.kwargs else None

    # an owner moves into its layer only if every one of its reads can (else all stay with the root)
    for n in reads:
        owner, _ = _owner(adapted, n.target)
        if owner is not adapted and unit_of[id(owner)] != {""} and len(unit_of[id(owner)]) == 1 \
                and "" not in unit_of[id(owner)] and slot(n) is None:
            unit_of[id(owner)].add("")
    moved: dict[str, list[tuple[fx.Node, int]]] = {}
    for n in reads:
        owner, _ = _owner(adapted, n.target)
        units = unit_of.get(id(owner), {""})
        if owner is not adapted and len(units) == 1 and "" not in units:
            moved.setdefault(next(iter(units)), []).append((n, slot(n)))

    # owners to attach: per graph module, one child per owner module
    def attach(gm: fx.GraphModule, owner: nn.Module, table: dict[int, str]) -> str:
        name = table.get(id(owner))
        if name is None:
            name = table[id(owner)] = f"_owner{len(table)}"
            gm.add_module(name, owner)
        return name

    root_table: dict[int, str] = {}
    for unit, pairs in moved.items():
        sub: fx.GraphModule = getattr(split, unit)
        placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
        table: dict[int, str] = {}
        first = next(p for p in sub.graph.nodes if p.op != "placeholder")
        drop = set()
        for node, k in pairs:
            owner, field = _owner(adapted, node.target)
            ph = placeholders[k]
            with sub.graph.inserting_before(first):
                read = sub.graph.get_attr(f"{attach(sub, owner, table)}.{field}")
            read.meta = dict(ph.meta)
            ph.replace_all_uses_with(read)
            drop.add(k)
        for k in sorted(drop, reverse=True):
            sub.graph.erase_node(placeholders[k])
        call = calls[unit]
        call.args = tuple(a for k, a in enumerate(call.args) if k not in drop)
        sub.recompile()
    for n in list(reads):
        if not n.users:
            graph.erase_node(n)
            continue
        owner, field = _owner(adapted, n.target)
        if owner is not adapted:
            n.target = f"{attach(split, owner, root_table)}.{field}"
    # drop the containers split_module built for the reads (they hold the original parameters)
    used = {str(n.target).split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for name, child in list(split.named_children()):
        if name not in used:
            delattr(split, name)
    split.recompile()


def _check_disjoint(run: fx.GraphModule, layer_subs: list[str]) -> None:
    """Each parameter belongs to one FSDP unit: a module called or read by two layers cannot be sharded per layer."""
    seen: dict[int, str] = {}
    for unit in layer_subs:
        for name, p in getattr(run, unit).named_parameters(remove_duplicate=False):
            other = seen.setdefault(id(p), unit)
            if other != unit:
                raise GraphAdaptError(f"the parameter {name!r} is used by two layers ({other}, {unit}; e.g. a module "
                                      "shared across layers): shard() needs each layer's parameters to be its own")
    for child_name, child in run.named_children():
        if child_name in layer_subs:
            continue
        for name, p in child.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                raise GraphAdaptError(f"the parameter {name!r} of layer {seen[id(p)]} is also reachable outside the "
                                      f"layers (through {child_name}); shard() cannot give it one unit")


def _packed_as_parameters(run: nn.Module, cast_to: torch.dtype | None = None) -> list[str]:
    """Make the packed bytes, block scales and code tables of every bitsandbytes base linear frozen parameters,
    so FSDP2 shards them with their layer (it shards parameters and replicates buffers). FSDP2 shards each
    parameter on its own and all-gathers a unit's mixed dtypes as bytes; a non-float parameter is never cast
    by a mixed-precision policy and a frozen one gets no gradient collective, so no float "quant storage" is
    needed (that is FSDP1's constraint: one flat parameter of one dtype per unit). Only the 0-d double-quant
    offset stays a replicated buffer. With a mixed-precision policy that casts floating parameters to ``cast_to``
    the float block scales and code tables stay replicated buffers too: cast, they would change the weights
    (bitsandbytes keeps them in float32). Returns the names."""
    done, seen = [], set()
    for path, m in run.named_modules():
        if type(m) not in (Packed4bitLinear, Packed8bitLinear) or id(m) in seen:
            continue
        seen.add(id(m))
        for field, b in list(m._buffers.items()):
            if b is None or b.dim() == 0 or (cast_to is not None and b.is_floating_point() and b.dtype != cast_to):
                continue
            del m._buffers[field]
            m._parameters[field] = nn.Parameter(b, requires_grad=False)
            done.append(f"{path}.{field}")
    return done


class ShardedModel(nn.Module):
    """The FSDP root of a sharded adapted model: call it with the adapted model's captured inputs.

    ``adapted`` (not a submodule, so the root manages only the weights outside the layers) shares every
    module with it; the adapted model's parameters are the FSDP shards while it is sharded."""

    def __init__(self, adapted: AdaptedModel, run: fx.GraphModule, units: list[str], policy: str):
        super().__init__()
        self.run = run
        object.__setattr__(self, "adapted", adapted)
        self.units, self.policy = units, policy
        # ``inspect.signature(sharded.forward)`` names the captured inputs (transformers.Trainer keeps the dataset
        # columns the forward takes; ``*args, **kwargs`` would make it drop them all)
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                  for n in adapted.input_names]

        def forward(*args, **kwargs):
            return ShardedModel.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.Signature(params)
        self.__dict__["forward"] = forward

    def forward(self, *args, **kwargs):
        adapted = self.adapted
        names = list(adapted.input_names)
        call = {**dict(zip(names, args)), **kwargs}
        baked = adapted.__dict__.get("baked_inputs") or {}  # bound into the graph at capture: drop if equal
        call = {k: v for k, v in call.items() if not (k in baked and k not in names and v == baked[k])}
        unknown = [k for k in call if k not in names and k not in adapted.constant_inputs]
        if unknown:
            raise GraphAdaptError(f"a sharded model takes the inputs the adapted model was captured with, {names}; "
                                  f"got {unknown} (compute the loss from the returned logits)")
        return self.run(**{**adapted.constant_inputs, **call})


def shard(adapted: AdaptedModel, mesh=None, *, policy: str = "layer", reshard_after_forward: bool = True,
          mp_policy=None, **fsdp_kwargs) -> ShardedModel:
    """Shard ``adapted`` with FSDP2 over ``mesh`` (default: all ranks of the default process group).

    Every rank calls this with an identical model (same seed for the adapters). ``policy="layer"`` (default)
    makes one unit of each recognised layer's frozen base weights and its adapters: FSDP2 shards each
    parameter on its own (mixed ``requires_grad`` in one unit is allowed, frozen ones get no gradient
    collective), so one all-gather per layer serves both. ``policy="separate"`` keeps each adapter module
    a unit of its own, as PEFT's ``fsdp_auto_wrap_policy`` does for FSDP1 (whose flat parameters need one
    ``requires_grad`` per unit); it costs one more all-gather per adapter module. Train the returned model;
    the optimizer takes ``[p for p in sharded.parameters() if p.requires_grad]``.

    A quantized base (bitsandbytes 4-bit/8-bit linears) is sharded with its layer: each rank holds ``1/world``
    of the packed bytes (with an ``mp_policy`` that casts float parameters, the float scales stay replicated).

    The adapted model lets go of its source model (whose weights share storage with it): drop your own
    reference to the model you passed to ``apply`` too, or every rank keeps the full weights alive."""
    from torch.distributed.fsdp import fully_shard

    if policy not in POLICIES:
        raise GraphAdaptError(f"policy={policy!r} is not a sharding policy; use one of {POLICIES}")
    if not isinstance(adapted, AdaptedModel):
        raise GraphAdaptError(f"shard() takes a graphadapt adapted model, got {type(adapted).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise GraphAdaptError("shard() needs an initialised process group: torch.distributed.init_process_group(...) "
                              "first (torchrun sets the environment)")
    if adapted.is_merged:
        raise GraphAdaptError("shard() trains adapters; this model is merged: call unmerge() first")
    if adapted.__dict__.get("_route") is not None:
        raise GraphAdaptError("shard() does not combine with graphadapt's gradient checkpointing yet: call "
                              "gradient_checkpointing_disable() first")
    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in adapted.parameters()):
        raise GraphAdaptError("this adapted model is already sharded")
    run, layer_subs = _layer_split(adapted)
    _rehome(run, adapted, layer_subs)
    packed = _packed_as_parameters(run, getattr(mp_policy, "param_dtype", None))
    try:
        _check_disjoint(run, layer_subs)
    except GraphAdaptError:  # leave the adapted model as it was: its packed tensors buffers again
        for name in packed:
            owner, field = _owner(run, name)
            owner._buffers[field] = owner._parameters.pop(field).data
        raise
    # the source model and captured call variants hold the full weights (shared storage): while sharded the
    # adapted model is not callable, so they would only keep every rank's memory at the unsharded size
    for attr in ("_source_model", "_signature_variants"):
        adapted.__dict__.pop(attr, None)
    kw: dict[str, Any] = dict(fsdp_kwargs)
    if mesh is not None:
        kw["mesh"] = mesh
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for unit in layer_subs:
        sub = getattr(run, unit)
        if policy == "separate":
            for child in dict(sub.named_children()).values():
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(sub, reshard_after_forward=reshard_after_forward, **kw)
    sharded = ShardedModel(adapted, run, layer_subs, policy)
    fully_shard(sharded, reshard_after_forward=reshard_after_forward, **kw)
    return sharded


def _adapted(model) -> AdaptedModel:
    return model.adapted if isinstance(model, ShardedModel) else model


def full_adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters, gathered to full tensors on every rank (a collective: call on all)."""
    out = {}
    for name, p in _adapted(model).trainable_parameters().items():
        t = p.detach()
        out[name] = t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t.clone()
    return out


@contextlib.contextmanager
def _full_parameters(adapted: AdaptedModel, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily install ``full`` tensors as the adapted model's trainable parameters (then the shards again)."""
    saved = []
    try:
        for name, t in full.items():
            owner, field = _owner(adapted, name)
            saved.append((owner, field, owner._parameters[field]))
            owner._parameters[field] = nn.Parameter(t, requires_grad=True)
        yield
    finally:
        for owner, field, p in saved:
            owner._parameters[field] = p


def save_sharded_adapters(model, directory: str | Path, **kwargs) -> Path | None:
    """Gather the adapters of a sharded model and write them (rank 0) in graphadapt's safetensors adapter
    format (``AdaptedModel.save_adapters``), loadable into an unsharded model with ``load_adapters``.
    A collective: every rank calls it; ranks other than 0 return ``None``."""
    adapted = _adapted(model)
    full = full_adapter_state(adapted)
    written = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        with _full_parameters(adapted, full):
            written = adapted.save_adapters(directory, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    return written


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters under the adapted model's names, as this rank's ``DTensor`` shards:
    ``torch.distributed.checkpoint.save(adapter_state_dict(sharded), checkpoint_id=dir)`` writes an
    adapter-only sharded checkpoint, each rank its own shards (nothing is gathered)."""
    return {n: p.detach() for n, p in _adapted(model).trainable_parameters().items()}


def load_dcp_adapters(adapted: AdaptedModel, checkpoint_dir: str | Path) -> list[str]:
    """Load an adapter-only ``torch.distributed.checkpoint`` (:func:`adapter_state_dict`) into an unsharded
    adapted model built with the same spec, in one process (no process group needed). Returns the names."""
    import torch.distributed.checkpoint as dcp

    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in adapted.parameters()):
        raise GraphAdaptError("load_dcp_adapters loads into an unsharded model; a sharded one loads with "
                              "torch.distributed.checkpoint.load(adapter_state_dict(sharded), checkpoint_id=...)")
    params = adapted.trainable_parameters()
    state = {n: torch.empty_like(p.detach()) for n, p in params.items()}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as e:  # a missing key or a shape mismatch (a BaseException)
        raise GraphAdaptError(f"could not load the adapter checkpoint {str(checkpoint_dir)!r} into this model "
                              f"({type(e).__name__}: {str(e)[:300]}); build the model with the spec it was "
                              "trained with") from e
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    return sorted(state)
