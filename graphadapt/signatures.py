"""Any call signature of the source model, on an adapted model (and per-layer gradient checkpointing).

An :class:`~graphadapt.model.AdaptedModel` runs its captured graph for the call it was captured
with (zero overhead: the input check already ran on every call). A call with other inputs —
``labels``, ``token_type_ids``, an omitted ``attention_mask``, ``output_hidden_states=True``,
positional arguments in the source's order — misses that check and lands here, where, like a
compiler's guard cache, one *variant* per signature is captured on first use:

    key = (names of the tensor inputs given, the non-tensor values given), ``None`` = omitted
    variant = capture(source, that call) ─▶ its base modules := the primary's (same objects)
              ─▶ recognise ─▶ the primary's spec planned and executed with the primary's adapter
              modules (same objects) ─▶ the primary's merge, dtype/device and train/eval mode

So a variant computes what the source model computes for that call (the loss from ``labels``
exactly as the source does) with the very parameters the primary trains: gradients, optimizer
state, merges and ``load_adapters`` are shared. A variant is re-planned from its own captured
base graph whenever the primary's plan (``set_active``), merge state, dtype/device or
checkpointing changed since it was built. Variants are never deep-copied (a copy builds its own).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx

from .capture import GRAPH_LOCK, capture
from .checkpointing import checkpointed_module
from .composition.route import ROUTING_INPUTS
from .errors import GraphAdaptError
from .model import AdaptedModel, SharedRefs, fusion_dropout
from .passes import PassResult, run_pass
from .plan import build_plan, execute_plan
from .structure import recognize
from .vocab import ADAPTERS

__all__ = ["SignatureError", "signature_of", "variants"]


class SignatureError(GraphAdaptError, TypeError):
    """A call the adapted model cannot serve (does not fit the source's forward, or cannot be captured)."""


class _Variants(dict):
    """signature key → variant entry; dropped (not copied) when the model is deep-copied."""

    def __deepcopy__(self, memo):
        return _Variants()


def signature_of(source) -> tuple[inspect.Signature | None, list[str] | None]:
    """(``forward``'s signature with ``self``, for ``forward.__signature__``; its positional parameter names)."""
    try:
        sig = inspect.signature(source.forward)
    except (TypeError, ValueError):
        return None, None
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sig.replace(parameters=[self_param, *params]), positional


def variants(model: AdaptedModel) -> dict:
    """The variants built so far: ``{key: variant}`` (key: tensor input names, non-tensor values)."""
    return {k: e["model"] for k, e in model.__dict__.get("_signature_variants", {}).items()}


# --------------------------------------------------------------------------- keys
def _freeze(v: Any):
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _bind(model: AdaptedModel, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call as keyword inputs of the source's forward (``None`` = omitted)."""
    sig = model._call_signature
    what = model.source_class.rsplit(".", 1)[-1]
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError as e:
        raise SignatureError(f"this graphadapt model takes the calls {what}.forward takes; {e}") from None
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise SignatureError(f"{what}.forward's *{name} are not supported by graphadapt; pass keywords")
        else:
            out[name] = value
    return {k: v for k, v in out.items() if v is not None}


def _key(call: dict[str, Any]) -> tuple:
    tensors = tuple(sorted(k for k, v in call.items() if isinstance(v, torch.Tensor)))
    consts = tuple(sorted((k, _freeze(v)) for k, v in call.items() if not isinstance(v, torch.Tensor)))
    return tensors, consts


def describe(key: tuple) -> str:
    tensors, consts = key
    return "(" + ", ".join([*tensors, *(f"{k}={v!r}" for k, v in consts)]) + ")"


def _primary_key(model: AdaptedModel) -> tuple:
    return _key({**{k: torch.empty(0) for k in model.input_names}, **model.constant_inputs,
                 **getattr(model, "baked_inputs", {})})


def _state(model: AdaptedModel) -> tuple:
    """What a variant must follow: plan, merge state, dtype/device, checkpointing options."""
    return (model._planning, model._merge_state, model._compute_dtype, model._compute_device,
            model.__dict__.get("_checkpoint_options"), model.training)


def _same(a: tuple, b: tuple) -> bool:
    return all(x is y or (type(x) is type(y) and not isinstance(x, (dict, SharedRefs)) and x == y)
               for x, y in zip(a, b))


# --------------------------------------------------------------------------- dispatch
def dispatch(model: AdaptedModel, args: tuple, kwargs: dict):
    """Serve a call: the primary graph (or its checkpointed twin), or the variant of the call's signature."""
    if model.__dict__.get("_call_signature") is not None:
        call = _bind(model, args, kwargs)
    else:
        call = {**dict(zip(model.input_names, args)), **kwargs}
    # omitted captured constants (use_cache=False) keep their captured value
    call = {**model.constant_inputs, **getattr(model, "baked_inputs", {}), **call}
    checkpointing = model.__dict__.get("_route") is not None and model.training and torch.is_grad_enabled()
    key = _key(call)
    primary = key == _primary_key(model)
    if primary and not checkpointing:
        return torch.nn.Module._call_impl(model, **call)
    if not primary and model.__dict__.get("_call_signature") is None:
        raise SignatureError(f"this graphadapt model takes only the inputs it was captured with, {model.input_names}")
    with GRAPH_LOCK:
        table = model.__dict__.get("_signature_variants")
        if table is None:
            table = _Variants()
            object.__setattr__(model, "_signature_variants", table)
        entry = table.get(key)
        if entry is None:
            entry = table[key] = {"model": None if primary else _capture_variant(model, call, key), "state": None,
                                  "run": None}
        if entry["state"] is None or not _same(entry["state"], _state(model)):
            _sync(model, entry, key)
    if not checkpointing:
        return entry["model"](**call)
    graph_module = entry["model"] if entry["model"] is not None else model
    takes = set(graph_module.input_names) | set(graph_module.constant_inputs)  # the graph's placeholders
    return entry["run"](**{k: v for k, v in call.items() if k in takes})


def _capture_variant(model: AdaptedModel, call: dict, key: tuple) -> AdaptedModel:
    source = model.__dict__.get("_source_model")
    what = f"{model.source_class.rsplit('.', 1)[-1]}{describe(key)}"
    if source is None:
        raise SignatureError(f"the source model is not available to capture the call {what}")
    order = {n: i for i, n in enumerate(model._call_signature.parameters)}  # the source's parameter order
    # distinct contiguous copies: torch.export guards on how example inputs alias (slices of one tensor)
    # adapter_ids / task_ids is the Route's / MultiTask's own input (added by the plan), not the source's
    call = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in sorted(call.items(), key=lambda kv: order.get(kv[0], len(order))) if k not in ROUTING_INPUTS}
    try:
        variant = capture(source, example_kwargs=call, cls=AdaptedModel, dynamic=bool(model.dynamic_dims))
    except GraphAdaptError as e:
        raise SignatureError(f"could not capture the call {what} (calls other than the captured one "
                             f"{model.input_names} are captured on first use): {e}") from e
    if model.__dict__.get("_quantize") is not None:
        _use_quantized_base(variant, model)
    base_graph = variant.snapshot_graph()
    _share_base(variant, model, what)
    variant._init_adapted(model.spec, [], model.structure_report, source, None, base_graph, model.services)
    return variant


def _use_quantized_base(variant: AdaptedModel, model: AdaptedModel) -> None:
    """A model built with ``apply(..., quantize=)`` holds packed linears its dense source lacks: the variant
    (captured from that source) reads the primary's packed modules, through the same ``linear_4bit`` calls."""
    from .quantized import PACKED, _use_packed_linears

    paths = set()
    for path, packed in model.named_modules():
        if not isinstance(packed, PACKED):
            continue
        parent, _, leaf = path.rpartition(".")
        try:
            owner = variant.get_submodule(parent) if parent else variant
        except AttributeError:
            continue
        if isinstance(getattr(owner, leaf, None), torch.nn.Module):
            setattr(owner, leaf, packed)
            paths.add(path)
    _use_packed_linears(variant, paths)


def _share_base(variant: AdaptedModel, model: AdaptedModel, what: str) -> None:
    """Make the variant's base submodules (and root parameters) the primary's own objects."""
    attrs_before = {}
    for n in variant.graph.nodes:
        if n.op == "get_attr":
            v = _get(variant, str(n.target))
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                attrs_before[str(n.target)] = v
    for name, child in list(variant.named_children()):
        mine = {k for k, _ in child.named_parameters()} | {k for k, _ in child.named_buffers()}
        if not mine:
            continue  # e.g. torch.export's _guards_fn: the variant's own
        theirs = model._modules.get(name)
        if theirs is None or mine != ({k for k, _ in theirs.named_parameters()} |
                                      {k for k, _ in theirs.named_buffers()}):
            raise SignatureError(f"the capture of {what} has other parameters under {name!r} than the adapted model")
        variant._modules[name] = theirs
    for leaf in list(variant._parameters):
        if leaf not in model._parameters:
            raise SignatureError(f"the capture of {what} has a parameter {leaf!r} the adapted model lacks")
        variant._parameters[leaf] = model._parameters[leaf]
    for target, before in attrs_before.items():
        after = _get(variant, target)
        if after is not before and not (isinstance(after, torch.Tensor) and after.shape == before.shape
                                        and torch.equal(after.to(before.dtype), before)):
            raise SignatureError(f"the capture of {what} reads a constant {target!r} that differs from the adapted "
                                 "model's; graphadapt cannot share its parameters")
    if ADAPTERS in model._modules:
        variant._modules[ADAPTERS] = model._modules[ADAPTERS]


def _get(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _remove_folded(gm: fx.GraphModule, folded: set) -> PassResult:
    done = []
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) in folded:
            n.replace_all_uses_with(n.args[1])
            gm.graph.erase_node(n)
            done.append(str(n.target))
    return PassResult(gm, bool(done), {"folded": done})


def _sync(model: AdaptedModel, entry: dict, key: tuple) -> None:
    """Re-plan the variant from its base graph to the primary's state; rebuild the checkpointed twin."""
    variant = entry["model"]
    what = f"{model.source_class.rsplit('.', 1)[-1]}{describe(key)}"
    if variant is not None:
        variant.graph = variant.snapshot_graph(variant._planning.base_graph)
        try:
            plan = build_plan(recognize(variant), model.spec)
            records = execute_plan(variant, plan, dropout=fusion_dropout(variant),
                                   base_seed=model.spec.effective_seed(None))
        except GraphAdaptError as e:
            raise SignatureError(f"the adapters of this model could not be placed in the capture of {what}: {e}") from e
        mine = {r.target for r in records}
        theirs = {r.target for r in model.adapter_records}
        if mine != theirs:
            raise SignatureError(f"the capture of {what} is recognised differently: adapter sites "
                                 f"{sorted(mine ^ theirs)[:4]} differ from the adapted model's; call it with "
                                 f"the captured inputs {model.input_names}")
        variant.spec, variant.adapter_records = model.spec, records
        variant._planning = SharedRefs(plan=plan, base_graph=variant._planning.base_graph)
        if model.is_merged:
            folded = set(model._merge_state["report"].folded)
            run_pass("merge_adapters[variant]", _remove_folded, variant, folded)
        dev, dt = model._compute_device, model._compute_dtype
        if (variant._compute_device, variant._compute_dtype) != (dev, dt):  # the primary was moved (.to)
            variant._apply(lambda t: t.to(dev, dt) if t.is_floating_point() else t.to(dev))
        variant.train(model.training)
    entry["run"] = None
    options = model.__dict__.get("_checkpoint_options")
    if options is not None:
        graph_module = variant if variant is not None else model
        entry["run"] = checkpointed_module(graph_module, _layer_paths(graph_module), options)
    entry["state"] = _state(model)


def _layer_paths(gm: AdaptedModel) -> list[str]:
    base = fx.GraphModule(gm, gm.snapshot_graph(gm._planning.base_graph))
    return [layer.module_path for layer in recognize(base).layers]


# --------------------------------------------------------------------------- checkpointing
def set_checkpointing(model: AdaptedModel, enable: bool, options: dict | None) -> None:
    """``gradient_checkpointing_enable/disable``: route training calls through per-layer checkpointed twins."""
    if not enable:
        object.__setattr__(model, "_route", None)
        model.__dict__.pop("_checkpoint_options", None)
        return
    # non-reentrant always: the reentrant form drops the gradients of adapters inside a layer whose input
    # does not require grad (the base is frozen), which is what transformers' enable_input_require_grads patches
    options = {**(options or {}), "use_reentrant": False}
    if _layer_paths(model) == []:
        raise GraphAdaptError("gradient checkpointing needs recognised transformer layers; "
                              "graphadapt inspect shows none in this model")
    model.__dict__["_checkpoint_options"] = options
    object.__setattr__(model, "_route", dispatch)

