"""Hollow base weights (:func:`graphadapt.outofcore.hollow_model`): which tensors of a model hold no values.

A hollow model's large parameters are untouched allocations whose values live in a checkpoint. The model
says so itself: ``graphadapt_hollow`` (the hollow parameter names) and ``graphadapt_checkpoint`` (an object
whose ``read(name)`` returns the checkpoint's tensor, and ``read_into(name, out)`` fills ``out``). A model
captured from it (:func:`graphadapt.apply`) shares those storages, so a tensor is hollow when its storage is
one of the hollow model's hollow storages, whatever its name in the captured graph.

Here, below every layer that computes with weights:

- :func:`hollow_storages` / :func:`held_hollow`: the hollow tensors of a source model / those a captured model
  holds;
- :func:`fill_hollow`: read the hollow tensors a captured model holds into place (the ``quantize=`` path of
  ``apply``: what is not quantized from the checkpoint is read, so nothing stays hollow);
- :func:`reading_checkpoint`: a dispatch mode under which ops computing with a hollow tensor get the
  checkpoint's value (adapter initialisations that read the base weight, e.g. a magnitude vector);
- :func:`check_forward` / :func:`refuse`: the clear error of every operation that would compute with hollow
  values (forward, training, ``merge``, ``to_base_model``, ``save_merged``, ``optimize_for_inference``)
  instead of silent garbage; :func:`placeholders_ok` lets the exporter's names-only forward through.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

from .errors import CheckpointError

HOLLOW_MARK = "_hollow_base"
"""Attribute of an adapted model (names of the hollow tensors it holds) set by ``apply``: its forward refuses."""

INSTEAD = ("graphadapt.outofcore.save_merged_from_checkpoint(checkpoint, model, out_dir) for a merged checkpoint, "
           "export_onnx(model, path) (weights read from the checkpoint while written; weights_from= for another "
           "copy), graphadapt.outofcore.StreamedReference(model, weight_source(model)) for reference outputs, or "
           "graphadapt.apply(hollow_model(checkpoint), spec, quantize='nf4') to train or run it (each weight read "
           "from the checkpoint and quantized)")


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake / meta / tensor subclasses without a plain storage
        return None


def hollow_storages(source: nn.Module | None) -> dict[int, str]:
    """``{storage data_ptr: parameter name}`` of the hollow parameters of ``source`` (empty for a model that
    is not hollow)."""
    names = getattr(source, "graphadapt_hollow", None) if source is not None else None
    if not names:
        return {}
    out = {}
    for n, p in source.named_parameters(remove_duplicate=False):
        if n in names:
            ptr = _ptr(p)
            if ptr is not None:
                out.setdefault(ptr, n)
    return out


def held_hollow(gm: nn.Module, source: nn.Module | None) -> dict[str, str]:
    """``{name in gm: hollow name in source}`` for every parameter or buffer of ``gm`` whose storage is a
    hollow storage of ``source``."""
    storages = hollow_storages(source)
    if not storages:
        return {}
    out = {}
    for n, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        ptr = _ptr(t)
        if ptr in storages:
            out[n] = storages[ptr]
    return out


def read_hollow(source: nn.Module, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The checkpoint's value of ``source``'s hollow parameter ``name``, into ``out`` (or a new tensor); the
    checkpoint entry must have the hollow parameter's shape and dtype."""
    ckpt = source.graphadapt_checkpoint
    like = dict(source.named_parameters(remove_duplicate=False))[name]
    entry = ckpt.entries.get(name)
    if entry is None or tuple(entry.shape) != tuple(like.shape) or entry.dtype != like.dtype:
        got = "absent" if entry is None else f"{tuple(entry.shape)} {entry.dtype}"
        raise CheckpointError(f"{name} is {got} in the checkpoint, the hollow model's is {tuple(like.shape)} "
                              f"{like.dtype}; build the model with hollow_model(checkpoint) from that checkpoint")
    return ckpt.read(name) if out is None else ckpt.read_into(name, out)


def fill_hollow(gm: nn.Module, source: nn.Module) -> list[str]:
    """Read every hollow tensor ``gm`` holds from the checkpoint into its own storage (shared with
    ``source``, whose hollow names then shrink); returns the source names read. Memory: those tensors."""
    held = held_hollow(gm, source)
    if not held:
        return []
    by_name = dict(source.named_parameters(remove_duplicate=False))
    done = []
    with torch.no_grad():
        for sname in dict.fromkeys(held.values()):
            read_hollow(source, sname, by_name[sname].data)
            done.append(sname)
    source.graphadapt_hollow = frozenset(source.graphadapt_hollow) - set(done)
    return done


class CheckpointReads:
    """``sub(x)``: for a CPU tensor whose storage is one of ``storages`` (``{storage data_ptr: checkpoint name}``),
    the checkpoint's value in ``x``'s shape, strides and offset (read with ``read(name)``, the two most recent
    kept: a linear and its adapter read the same weight); any other value unchanged. The read and the view run
    with the dispatch modes disabled: they are plain tensor work that no mode (e.g. a verifier's fp32 upcast)
    may alter. Shared by the modes that compute with hollow weights (:func:`reading_checkpoint`,
    ``graphadapt.outofcore.StreamedReference``)."""

    def __init__(self, storages: dict[int, str], read):
        self.storages, self.read = storages, read
        self.cache: dict[str, torch.Tensor] = {}

    def sub(self, x):
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.is_sparse:
            return x
        name = self.storages.get(_ptr(x))
        if name is None:
            return x
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            t = self.cache.pop(name, None)
            if t is None:
                t = self.read(name)
            self.cache[name] = t
            while len(self.cache) > 2:
                self.cache.pop(next(iter(self.cache)))
            return t.as_strided(x.shape, x.stride(), x.storage_offset())


@contextlib.contextmanager
def reading_checkpoint(gm: nn.Module, source: nn.Module | None) -> Iterator[None]:
    """Inside the block, an op that computes with a hollow tensor ``gm`` holds gets the checkpoint's value
    instead (read then, the two most recent kept); views of it stay views (nothing read), and an op writing
    into one is refused. For adapter insertion over a hollow base: initialisations that read the base weight
    (a weight-norm magnitude, an SVD-based init, a ``modules_to_save`` copy) see its real values, while inits
    that only need its shape read nothing. A no-op when ``gm`` holds no hollow tensor."""
    storages = hollow_storages(source)
    if not storages or not held_hollow(gm, source):
        yield
        return
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map

    reads = CheckpointReads(storages, source.graphadapt_checkpoint.read)

    class ReadHollow(TorchDispatchMode):
        graphadapt_loads_hollow = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "is_view", False):  # an alias: still hollow, read when something computes with it
                return func(*args, **kwargs)
            for i, a in enumerate(func._schema.arguments):
                if a.alias_info is None or not a.alias_info.is_write:
                    continue
                for t in tree_leaves(args[i] if i < len(args) else kwargs.get(a.name)):
                    if isinstance(t, torch.Tensor) and _ptr(t) in storages:
                        raise CheckpointError(
                            f"{func} would write into the hollow base weight {storages[_ptr(t)]} (never read from "
                            "the checkpoint); this adapter initialisation changes the base: apply it to a loaded "
                            "model, or to hollow_model(checkpoint) with quantize='nf4'")
            return func(*tree_map(reads.sub, args), **tree_map(reads.sub, kwargs))

    with ReadHollow():
        yield


def unshadowed(gm: nn.Module, source: nn.Module | None) -> list[str]:
    """Hollow parameters of ``source`` that ``gm`` has no tensor for under their name (or a tied twin's): a
    copy of ``source`` with ``gm``'s values (``to_base_model``, ``save_merged``) would keep them unread."""
    storages = hollow_storages(source)
    if not storages:
        return []
    own = {n for n, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}
    groups: dict[int, list[str]] = {}
    for n, p in source.named_parameters(remove_duplicate=False):
        ptr = _ptr(p)
        if ptr in storages:
            groups.setdefault(ptr, []).append(n)
    return sorted(g[0] for g in groups.values() if not own.intersection(g))


_PLACEHOLDERS = contextvars.ContextVar("graphadapt_hollow_placeholders", default=False)


@contextlib.contextmanager
def placeholders_ok() -> Iterator[None]:
    """Inside the block a hollow model's forward runs (for the exporter's own uses whose values are never read:
    naming outputs of a copy whose weights are placeholders)."""
    token = _PLACEHOLDERS.set(True)
    try:
        yield
    finally:
        _PLACEHOLDERS.reset(token)


def _loading_hollow() -> bool:
    """True inside graphadapt.outofcore's dispatch mode that gives each op the checkpoint's value of a hollow
    tensor (``StreamedReference``), while export traces the model (fake tensors: no value is read), and in
    :func:`placeholders_ok`."""
    if _PLACEHOLDERS.get() or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, FakeTensorMode) or getattr(m, "graphadapt_loads_hollow", False)
               for m in _get_current_dispatch_mode_stack())


def check_forward(model: nn.Module) -> None:
    """Refuse a forward of an adapted model that holds hollow base weights (its outputs would be garbage),
    except under the checkpoint-reading dispatch mode or while tracing."""
    held = model.__dict__.get(HOLLOW_MARK)
    if held and not _loading_hollow():
        raise CheckpointError(
            f"this model was built on hollow_model(checkpoint): {len(held)} base weight(s) (e.g. {sorted(held)[0]}) "
            f"were never read, so its outputs would be meaningless. Use {INSTEAD}")


def refuse(model: nn.Module, what: str, source: nn.Module | None = None) -> None:
    """Raise :class:`CheckpointError` when ``model`` holds hollow base weights that ``what`` would compute with
    (with ``source``: also when a copy of ``source`` filled from ``model`` would keep unread weights)."""
    held = model.__dict__.get(HOLLOW_MARK) or unshadowed(model, source)
    if held:
        raise CheckpointError(
            f"{what} is not possible on a model built on hollow_model(checkpoint): {len(held)} base weight(s) "
            f"(e.g. {sorted(held)[0]}) were never read. Use {INSTEAD}")


__all__ = ["HOLLOW_MARK", "hollow_storages", "held_hollow", "read_hollow", "fill_hollow", "CheckpointReads", "unshadowed", "check_forward", "refuse",
           "placeholders_ok", "reading_checkpoint"]
