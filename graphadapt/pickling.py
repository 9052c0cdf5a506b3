"""``pickle`` / ``torch.save`` of an :class:`~graphadapt.model.AdaptedModel`: rebuilt, not serialised.

A captured graph holds generated code and torch.export metadata that do not pickle. As a PEFT model
pickles as "base model + adapter weights", an adapted model pickles as the recipe that rebuilds it::

    AdaptedModel ──__reduce__──▶ (rebuild, {source model, saved spec (with its activation), adapter and
                                             modules_to_save tensors, example inputs, dtype/device,
                                             train mode, merge arguments})
    unpickle ──▶ graphadapt.apply(source, spec, example_kwargs=...) ──▶ .to(...) ──▶ adapter tensors
             ──▶ merge(...) when it was merged ──▶ train/eval as saved

``torch.save(model, path)`` opens (truncates) ``path`` before it pickles anything, so refusing
inside pickling would destroy the user's file: every model that can be rebuilt therefore pickles.
A model merged in place without a backup pickles as it is — its source holds the merged weights —
and unpickles merged and irreversible, with bit-identical weights (``Merger.adopt_merged``). Only a
model that keeps no source model cannot be rebuilt; :func:`check_picklable` says so.
"""

from __future__ import annotations

import torch

from .checkpoints import saved_spec
from .checkpoints.trainable import trainable_module_keys
from .errors import GraphAdaptError, MergeError
from .spec import Spec
from .vocab import adapter_prefix

FORMAT = 1


def check_picklable(adapted) -> None:
    if adapted.__dict__.get("_source_model") is None:
        raise GraphAdaptError("this model keeps no source model to rebuild from; save its adapters with "
                              "save_adapters() instead of pickling it")
    from .hollow import refuse

    # a hollow base would be written out whole as unread (meaningless) values: gigabytes of nothing
    refuse(adapted, "pickling (torch.save of the model)")


def pickle_state(adapted) -> dict:
    """What :func:`rebuild` needs to make ``adapted`` again (``graphadapt.api`` pairs the two as the
    model's ``reduce`` service: ``(api.unpickle, (pickle_state(model),))``)."""
    check_picklable(adapted)
    src = adapted._source_model
    st = adapted._merge_state
    merge = None
    base = {}
    if st is not None:
        report = st["report"]
        folded = set(report.folded)
        names = sorted({r.adapter for r in adapted.adapter_records if r.target in folded})
        merge = {"names": names or None, "in_place": st["in_place"], "keep_backup": st.get("reversible", True)}
        if st["in_place"] and merge["keep_backup"]:  # the source holds merged weights: pickle the originals (the backups) with it
            by_ptr = {p.data_ptr(): n for n, p in src.named_parameters(remove_duplicate=False)}
            for pname, orig in st["backups"].items():
                sname = by_ptr.get(adapted.get_parameter(pname).data_ptr())
                if sname is None:
                    raise MergeError(f"cannot map merged weight {pname} back onto the source model to pickle it; "
                                     "unmerge() first")
                base[sname] = orig.detach().cpu()
    keep = set(trainable_module_keys(adapted))
    prefix = adapter_prefix()
    tensors, grads = {}, {}
    # while merged, folded adapters are frozen (and the state records their earlier flags)
    frozen = {id(p): flag for p, flag in (st or {}).get("frozen", ())}
    for k, v in adapted.state_dict(keep_vars=True).items():
        if k.startswith(prefix) or k in keep:
            tensors[k] = v.detach().cpu().clone()
            if isinstance(v, torch.nn.Parameter):
                grads[k] = frozen.get(id(v), v.requires_grad)
    state = {"format": FORMAT, "source": src, "spec": saved_spec(adapted).to_dict(), "tensors": tensors,
             "requires_grad": grads, "base": base, "merge": merge, "training": adapted.training,
             "example_kwargs": None if adapted.__dict__.get("decoder_cache") else adapted._example_inputs,
             "cache": bool(adapted.__dict__.get("decoder_cache")), "dynamic": bool(adapted.dynamic_dims),
             "dtype": adapted._compute_dtype, "device": str(adapted._compute_device),
             "quantize": adapted.__dict__.get("_quantize"),  # apply(..., quantize=): the rebuild quantizes again
             # every floating tensor's own dtype (an fp16 model keeps fp32 rotary buffers): the rebuild
             # restores each, instead of casting the whole model to one dtype
             "dtypes": _float_dtypes(adapted)}
    return state


def _float_dtypes(model) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)] if t.is_floating_point()}


def rebuild(state: dict, apply):
    """Inverse of :func:`pickle_state`; ``apply`` is :func:`graphadapt.api.apply` (handed in: this layer
    sits below the api)."""

    if state.get("format") != FORMAT:
        raise GraphAdaptError(f"this pickle was written by another graphadapt version (format "
                              f"{state.get('format')!r}, expected {FORMAT}); re-create it")
    src = state["source"]
    if state["base"]:
        own = dict(src.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for k, v in state["base"].items():
                own[k].copy_(v)
    model = apply(src, Spec.from_dict(state["spec"]), example_kwargs=state["example_kwargs"],
                  dynamic=state["dynamic"], cache=state["cache"], quantize=state.get("quantize"))
    dtypes = state.get("dtypes")
    if dtypes is None:  # pickled before per-tensor dtypes were kept
        model.to(device=torch.device(state["device"]), dtype=state["dtype"])
    else:
        model.to(device=torch.device(state["device"]))
        with torch.no_grad():
            for n, t in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
                want = dtypes.get(n)
                if want is not None and t.is_floating_point() and t.dtype != want:
                    t.data = t.data.to(want)
        model._apply(lambda t: t)  # the graph's compute dtype follows its (restored) parameters
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(state["tensors"]) - set(own))
    if missing:
        raise GraphAdaptError(f"the pickled adapters do not fit the rebuilt model ({missing[:3]} missing); "
                              "was it pickled by another graphadapt version?")
    with torch.no_grad():
        for k, v in state["tensors"].items():
            own[k].copy_(v)
    for k, flag in state["requires_grad"].items():
        own[k].requires_grad_(flag)
    if state["merge"] is not None and not state["merge"].get("keep_backup", True):
        model.services.merger.adopt_merged(model, state["merge"]["names"])  # the source's weights are the merged ones
        model.train(state["training"])
    elif state["merge"] is not None:
        model.merge(**state["merge"])
    else:
        model.train(state["training"])
    return model


__all__ = ["pickle_state", "rebuild", "check_picklable"]
