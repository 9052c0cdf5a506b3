"""Swappable ONNX adapters: the base graph once, adapter weights as overridable graph inputs.

``export_onnx(adapted, path, swappable=True, max_rank=R)`` exports a copy of ``adapted`` whose active adapters
are *swap slots* (:mod:`graphadapt.hotswap`: scaling folded into the tensors, rank-like sizes zero-padded to
``R``, exact) and lifts every slot tensor to a graph input named by its state-dict key
(``adapters.<slot>.<site>.<param>``) that also has an initializer of the same name — its default, the exported
adapter. onnxruntime lets a run override such inputs: by feeding them, or from an adapter file
(``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``) written by :func:`export_onnx_adapter`. One
``InferenceSession`` then serves any adapter of the same sites, method and options with rank up to ``R``.

The tensors come from the modules through the swap slot protocol
(:class:`graphadapt.passes.modules.SwappableModule`); an adapter without one is refused by name.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphadapt.errors import ExportError, VerificationError
from graphadapt.exporters import _model
from graphadapt.exporters.verify import (DEFAULT_TOLERANCES, VerifyResult, compare, fresh_inputs, import_ort,
                                         verification_providers)
from graphadapt.hotswap import prepare_slots, slot_modules, slot_state

SWAPPABLE_KEY = "graphadapt.swappable"
"""ONNX metadata key: JSON ``{"max_rank": R, "slots": {slot: {"rank": r, "sites": {site: signature}}}}``."""

ADAPTER_SUFFIX = ".onnx_adapter"

__all__ = ["ADAPTER_SUFFIX", "SWAPPABLE_KEY", "Lifted", "export_onnx_adapter", "lift", "read_swappable",
           "verify_swappable"]


class _LiftedModule(nn.Module):
    """``forward(**inputs, graphadapt_w0=…, …)``: the model with its slot tensors taken from the inputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.lifted_names = names

    def forward(self, **kwargs):
        from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses

        tensors = {name: kwargs.pop(f"graphadapt_w{i}") for i, name in enumerate(self.lifted_names)}
        with _reparametrize_module(self.model, tensors):
            # ``forward``, not ``__call__``: the model is traced as the root of a normal export is (without its
            # input-checking hook, whose value checks cannot be traced)
            return self.model.forward(**kwargs)


@dataclass
class Lifted:
    """What :func:`lift` made: the module to trace, its extra inputs, their graph names, the slot metadata."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    io_names: dict[str, str]
    defaults: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing every tensor (slot conversion assigns new parameters, never writes)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    source = getattr(model, "__dict__", {}).get("_source_model")
    if source is not None:
        memo[id(source)] = source
    return copy.deepcopy(model, memo)


def _signature(sig: tuple) -> str:
    return json.dumps(sig, default=repr)


def lift(model: nn.Module, max_rank: int | None = None, model_inputs=()) -> Lifted:
    """The export copy of ``model`` with its active adapters as slots of rank ``max_rank``, slot tensors lifted."""
    if not hasattr(model, "adapter_records"):
        raise ExportError(f"swappable=True exports a graphadapt adapted model (graphadapt.apply), got "
                          f"{type(model).__name__}")
    if getattr(model, "is_merged", False):
        raise ExportError("swappable=True needs the adapters in the graph: unmerge() first")
    if model.spec.composition is not None:
        raise ExportError(f"swappable=True exports the active adapters as slots; a composition block "
                          f"({type(model.spec.composition).__name__}) is not supported: set_active(names) first")
    names = model.active_adapters()
    if not names:
        raise ExportError("swappable=True needs at least one active adapter to export as a slot")
    copy_ = _shared_copy(model)
    copy_.eval()
    ranks = prepare_slots(copy_, max_rank, names, error=ExportError)
    inputs: dict[str, torch.Tensor] = {}
    io_names: dict[str, str] = {}
    defaults: dict[str, torch.Tensor] = {}
    slots: dict[str, Any] = {}
    lifted: list[str] = []
    for slot in names:
        sites = {}
        for key, mod in slot_modules(copy_, slot, ExportError).items():
            sites[key] = _signature(mod.swap_signature())
            for k, p in mod.named_parameters():
                full = f"adapters.{slot}.{key}.{k}"
                arg = f"graphadapt_w{len(lifted)}"
                lifted.append(full)
                inputs[arg] = p.detach()
                io_names[arg] = full
                defaults[full] = p.detach()
        slots[slot] = {"rank": ranks[slot], "sites": sites}
    meta = {"max_rank": max_rank, "slots": slots}
    return Lifted(_lifted_module(copy_, lifted, [*model_inputs, *inputs]), inputs, io_names, defaults, meta)


def _lifted_module(model: nn.Module, lifted: list[str], arg_names: list[str]) -> nn.Module:
    """A :class:`_LiftedModule` whose ``forward`` declares ``arg_names`` (torch.export binds keyword inputs to
    a signature; ``**kwargs`` alone does not bind)."""
    import inspect

    def forward(self, **kwargs):
        return _LiftedModule.forward(self, **kwargs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in arg_names]
    forward.__signature__ = inspect.Signature(params)
    cls = type("LiftedAdaptedModel", (_LiftedModule,), {"forward": forward})
    return cls(model, lifted)


def add_defaults(program, lifted: Lifted) -> None:
    """Give every lifted graph input an initializer of its name (its default value; overridable)."""
    import onnx_ir as ir

    graph = program.model.graph
    found = set()
    for value in graph.inputs:
        t = lifted.defaults.get(value.name)
        if t is None:
            continue
        value.const_value = ir.tensor(t.detach().cpu().contiguous().numpy(), name=value.name)
        graph.register_initializer(value)
        found.add(value.name)
    lost = sorted(set(lifted.defaults) - found)
    if lost:
        raise ExportError(f"the exporter dropped {len(lost)} adapter input(s) (e.g. {lost[:2]}): a tensor the graph "
                          "does not read; export without swappable=True")
    program.model.metadata_props[SWAPPABLE_KEY] = json.dumps(lifted.meta, sort_keys=True)


def read_swappable(onnx_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(slot metadata, ``{input name: shape}`` of the overridable inputs) of a swappable export."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if SWAPPABLE_KEY not in meta:
        raise ExportError(f"{onnx_path} is not a swappable export (no {SWAPPABLE_KEY} metadata); export it with "
                          "graphadapt.export_onnx(adapted, path, swappable=True)")
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    inputs = {v.name for v in proto.graph.input}
    return json.loads(meta[SWAPPABLE_KEY]), {k: v for k, v in shapes.items() if k in inputs}


def export_onnx_adapter(adapted: nn.Module, name: str, path: str | os.PathLike, *,
                        onnx_model: str | os.PathLike | None = None, slot: str | None = None,
                        max_rank: int | None = None, overwrite: bool = False) -> Path:
    """Write adapter ``name`` of ``adapted`` as an onnxruntime adapter file (``onnxruntime.AdapterFormat``) for
    slot ``slot`` of a swappable export.

    ``onnx_model``: the swappable export it is for (recommended): the slot (default: its only slot, else
    ``name``) and its rank come from it, and sites, method options and every tensor's shape are checked
    against it. Without it: slot ``slot`` (default ``name``), ranks padded to ``max_rank`` (default: own).
    Use it with ``sess.run(None, feeds, run_options)`` after
    ``run_options.add_active_adapter(onnxruntime.LoraAdapter().Load(path))`` — see docs/deployment.md.
    """
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give the adapter file's path (e.g. {name}{ADAPTER_SUFFIX})")
    if not path.parent.is_dir():
        raise ExportError(f"directory {path.parent} does not exist; create it before writing {path.name}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True to replace it")
    mods = slot_modules(adapted, name, ExportError)
    shapes = None
    if onnx_model is not None:
        meta, shapes = read_swappable(onnx_model)
        slots = meta["slots"]
        if slot is None:
            slot = next(iter(slots)) if len(slots) == 1 else name
        if slot not in slots:
            raise ExportError(f"{onnx_model} has no slot {slot!r} (slots: {sorted(slots)}); pass slot=...")
        info = slots[slot]
        missing, extra = sorted(set(info["sites"]) - set(mods)), sorted(set(mods) - set(info["sites"]))
        if missing or extra:
            raise ExportError(f"adapter {name!r} is not at slot {slot!r}'s sites: {len(missing)} slot site(s) it "
                              f"lacks (e.g. {missing[:2]}), {len(extra)} it has that the slot lacks (e.g. {extra[:2]})")
        for key, mod in mods.items():
            if _signature(mod.swap_signature()) != info["sites"][key]:
                raise ExportError(f"adapter {name!r} differs from slot {slot!r} at {key} in more than rank and "
                                  f"scaling ({_signature(mod.swap_signature())} vs {info['sites'][key]})")
        rank = info["rank"]
    else:
        slot = slot or name
        rank = max_rank
    tensors: dict[str, np.ndarray] = {}
    for key, mod in mods.items():
        own = mod.swap_rank()
        r = rank if own is not None else None
        if r is not None and own > r:
            raise ExportError(f"adapter {name!r} has rank {own} at {key}, more than the slot's rank {r}; export the "
                              f"model with a larger max_rank")
        for k, t in mod.swap_tensors(r).items():
            tensors[f"adapters.{slot}.{key}.{k}"] = t.detach().cpu().contiguous().numpy()
    if shapes is not None:
        want = {k: s for k, s in shapes.items() if k.startswith(f"adapters.{slot}.")}
        if set(want) != set(tensors):
            raise ExportError(f"adapter {name!r} does not give slot {slot!r}'s tensors: missing "
                              f"{sorted(set(want) - set(tensors))[:2]}, extra {sorted(set(tensors) - set(want))[:2]}")
        for k, a in tensors.items():
            if tuple(a.shape) != tuple(want[k]):
                raise ExportError(f"{k}: shape {tuple(a.shape)} does not fit the export's {tuple(want[k])}")
    ort = import_ort()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def verify_swappable(onnx_path: str | os.PathLike, reference: nn.Module, adapter_file=None,
                     *, example_inputs: dict[str, Any] | None = None, inputs: dict[str, torch.Tensor] | None = None,
                     atol: float | None = None, rtol: float | None = None, providers: list[str] | None = None,
                     session=None) -> VerifyResult:
    """Compare a swappable export with PyTorch: run with its defaults (``adapter_file`` None) or with
    ``adapter_file`` (a path, or a list of paths: one per slot) active (``RunOptions.add_active_adapter``), against ``reference`` (the adapted model whose
    active adapter is the one expected). ``session``: reuse an ``InferenceSession`` of ``onnx_path`` (this is
    what serving does: one session, adapters switched per run). Raises :class:`VerificationError` past
    ``|onnx - torch| <= atol + rtol·|torch|`` (fp32 defaults)."""
    ort = import_ort()
    d_atol, d_rtol = DEFAULT_TOLERANCES[torch.float32]
    atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    if inputs is None:
        example = _model.example_inputs(reference, example_inputs)
        inputs = fresh_inputs(onnx_path, example, reference)
    if session is None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), opts, providers=verification_providers(providers))
    run_options = ort.RunOptions()
    files = [] if adapter_file is None else (
        [adapter_file] if isinstance(adapter_file, (str, os.PathLike)) else list(adapter_file))
    adapters = []  # RunOptions holds the adapters by raw pointer: they must outlive the run
    for f in files:  # one file per slot; several slots may be swapped in one run
        adapters.append(ort.LoraAdapter())
        adapters[-1].Load(str(f))
        run_options.add_active_adapter(adapters[-1])
    feeds = {i.name: inputs[i.name].cpu().numpy() for i in session.get_inputs()}
    try:
        outputs = session.run(None, feeds, run_options)
    except Exception as e:
        raise VerificationError(f"onnxruntime could not run {Path(onnx_path).name}"
                                + (f" with adapter(s) {[str(f) for f in files]}" if files else "")
                                + f": {_model.one_line(e)}") from e
    with _model.inference_mode(reference), torch.no_grad():
        ref = [t.detach() for t in _model.flat_tensors(reference(**inputs))]
    names = [o.name for o in session.get_outputs()]
    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
    what = f" with {', '.join(Path(f).name for f in files)}" if files else " with its default adapters"
    max_abs, max_rel = compare(names, ref, outputs, atol, rtol, f" on inputs {shapes}{what}")
    return VerifyResult(max_abs_diff=max_abs, max_rel_diff=max_rel, atol=atol, rtol=rtol,
                        providers=session.get_providers(), input_shapes=shapes)
