"""Capture: ``nn.Module`` → :class:`CapturedModule` (an ATen-IR ``GraphModule``).

``torch.export.export(..., strict=False)`` with dynamic batch/sequence dims, then
a portability pass that removes the dtype/device pins torch.export bakes into
the graph (``_assert_tensor_metadata``, ``to(float32)``, ``arange(device=cpu)``,
``finfo(float32).min`` mask fills), so ``.to(device/dtype)`` works.

The captured module shares parameter *storage* with the caller's model but owns
new ``Parameter`` objects, so freezing or re-wrapping them never changes the
caller's ``requires_grad`` flags.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import os
import re
import threading
import traceback
import warnings
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from .compiling import compile_module, uncompile_module
from .contract import check_boundary, relax_derived_minimums
from .errors import CaptureError
from .passes import run_pass
from .passes.portability import make_portable, retarget
from . import program_cache as programs
from .quantized import install_quantized_weights, opaque_quantized_linears, quantized_modules

__all__ = ["capture", "CapturedModule", "SignatureMiss", "synthesize_inputs", "retarget", "GRAPH_LOCK", "serialised"]

# torch.export / torch.onnx.export keep global tracing state (mode stacks, the fake-tensor
# mode, symbolic shape envs) and fork the global RNG: two captures in two threads corrupt each
# other. Every graphadapt entry point that traces, merges or flips a caller's train/eval mode
# holds this (re-entrant) lock, so concurrent calls run one after another instead.
GRAPH_LOCK = threading.RLock()


def serialised(fn):
    """Run ``fn`` holding :data:`GRAPH_LOCK`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with GRAPH_LOCK:
            return fn(*args, **kwargs)
    return wrapper

aten = torch.ops.aten



# --------------------------------------------------------------------------- inputs
def _config(model: nn.Module):
    return getattr(model, "config", None)


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _takes_use_cache(model: nn.Module) -> bool:
    """``forward`` takes ``use_cache``, by name or through ``**kwargs`` to a base model that names it (a cache in
    the outputs would not capture)."""
    if "use_cache" in _forward_params(model):
        return True
    try:
        var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    base = getattr(model, "base_model", None)
    return (var_kw and base is not None and base is not model and "use_cache" in _forward_params(base)
            and bool(getattr(_config(model), "use_cache", False)))


def synthesize_inputs(model: nn.Module, batch: int = 2, seq: int = 9, decoder_seq: int = 6,
                      seed: int = 1234) -> dict[str, Any]:
    """Example kwargs for ``model`` built from its config (no tokenizer, no download).

    Token ids for text models, pixel values for vision models, log-mel ``input_features``
    ``[B, num_mel_bins, 2·max_source_positions]`` for Whisper-style audio encoders (two
    frames per encoder position: the conv stem's stride); decoder-only models
    get ``use_cache=False`` and encoder–decoder models ``decoder_input_ids``.
    Batch and sequence lengths are distinct and >1 so torch.export does not
    specialise them. Uses a private generator: the caller's RNG is untouched.
    """
    cfg = _config(model)
    if cfg is None:
        raise CaptureError(
            f"{type(model).__name__} has no `.config`, so graphadapt cannot invent example inputs; "
            "pass example_inputs=(...) or example_kwargs={...} to capture/apply.")
    g = torch.Generator().manual_seed(seed)
    params = _forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    kw: dict[str, Any] = {}
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(cfg, "num_channels", 3)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        kw["pixel_values"] = torch.randn(batch, ch, size, size, generator=g).to(dev, dtype)
    elif main == "input_features":
        kw["input_features"] = _audio_features(model, cfg, batch, g, dev)
    else:
        vocab = getattr(cfg, "vocab_size", None) or 100
        kw["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
        if "attention_mask" in params:
            kw["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=dev)
    if getattr(cfg, "is_encoder_decoder", False):
        vocab = getattr(cfg, "vocab_size", None) or 100
        kw["decoder_input_ids"] = torch.randint(0, vocab, (batch, decoder_seq), generator=g).to(dev)
    if _takes_use_cache(model):
        kw["use_cache"] = False
    return kw


def _audio_features(model: nn.Module, cfg, batch: int, g: torch.Generator, dev) -> torch.Tensor:
    """Whisper-style log-mel features ``[B, num_mel_bins, frames]`` from the config."""
    mels, positions = getattr(cfg, "num_mel_bins", None), getattr(cfg, "max_source_positions", None)
    if not isinstance(mels, int) or not isinstance(positions, int):
        raise CaptureError(
            f"{type(model).__name__} reads input_features, but its config has no num_mel_bins/max_source_positions "
            "to size them from; pass example_kwargs={'input_features': ...} to capture/apply.")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(batch, mels, 2 * positions, generator=g).to(dev, dtype)


def _dynamic_shapes(kwargs: Mapping[str, Any], dynamic: bool) -> tuple[dict, dict]:
    """Dynamic-shape spec for export plus a readable ``{input: {axis: name}}`` map."""
    Dim = torch.export.Dim
    spec: dict[str, Any] = {}
    names: dict[str, dict[int, str]] = {}
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            spec[k] = None
            continue
        axes: dict[int, str] = {}
        if dynamic and v.dim() >= 1:
            axes[0] = "batch"
            # token-like inputs [B, T] (ids, masks, positions) also get a dynamic sequence
            if v.dim() == 2 and not v.is_floating_point():
                axes[1] = "decoder_sequence" if k.startswith("decoder_") else "sequence"
        spec[k] = {a: Dim.AUTO for a in axes} or None
        if axes:
            names[k] = axes
    return spec, names


def _nest_var_keyword(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """torch.export keys dynamic shapes by forward's parameters: inputs that land in ``**kwargs``
    (transformers 5 passes ``output_hidden_states``/``return_dict`` that way) go under its name."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return spec
    var = next((n for n, p in params.items() if p.kind == p.VAR_KEYWORD), None)
    extra = {k: v for k, v in spec.items() if k not in params or k == var}
    if var is None or not extra:
        return spec
    return {**{k: v for k, v in spec.items() if k not in extra}, var: extra}


def _baked_inputs(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Non-tensor inputs that forward takes through ``**kwargs`` (torch.export cannot shape-spec them)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return {}
    return {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and k not in params}


def _widen_unit_axes(kwargs: dict[str, Any], names: dict[str, dict[int, str]]) -> dict[str, Any]:
    """Repeat example inputs along dynamic axes whose every example has size 1.

    torch.export specialises a size-1 dim (broadcasting rules make 1 special), so a model
    captured on batch 1 or sequence 1 would then only accept that size. Size 2 keeps it dynamic;
    repeating the example's own values keeps them valid (token ids, masks, pixels).
    """
    sizes: dict[str, int] = {}
    for k, axes in names.items():
        for a, dim in axes.items():
            sizes[dim] = max(sizes.get(dim, 0), kwargs[k].shape[a])
    out = dict(kwargs)
    for k, axes in names.items():
        for a, dim in axes.items():
            if sizes[dim] == 1 and out[k].shape[a] == 1:
                out[k] = torch.cat([out[k], out[k]], dim=a)
    return out


def _static_axes(gm: fx.GraphModule) -> dict[str, dict[int, int]]:
    """``{input: {axis: size}}`` for every axis torch.export fixed (not symbolic) in the graph."""
    out: dict[str, dict[int, int]] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            fixed = {a: int(d) for a, d in enumerate(val.shape) if not isinstance(d, torch.SymInt)}
            out[str(n.target)] = {"rank": val.dim(), **fixed}
    return out


@contextlib.contextmanager
def quiet_torch_logs():
    """Silence torch's loggers and stderr for the block (a failed torch.export prints its partial
    graph, hundreds of lines, to stderr before raising).

    ``GRAPHADAPT_DEBUG=1`` in the environment keeps them. Callers hold :data:`GRAPH_LOCK`.
    """
    if os.environ.get("GRAPHADAPT_DEBUG", "") not in ("", "0"):
        yield
        return
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n == "torch" or n.startswith(("torch.", "torch_", "onnxscript"))]
    saved = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, disabled in saved:
            lg.disabled = disabled


# --------------------------------------------------------------------------- errors
def _eager_failure(model: nn.Module, kwargs: Mapping[str, Any]) -> BaseException | None:
    """The error of the model's own (eager) forward on the capture inputs, or None when it runs: an export
    failure that eager execution shares is the model's or its config's, not torch.export's."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**kwargs)
    except Exception as e:  # noqa: BLE001 - only reported
        return e
    return None


def _describe_failure(model: nn.Module, exc: BaseException, eager_fails: bool = False) -> str:
    """One-paragraph diagnosis of an export failure: which module, which line, what to try."""
    modules = {id(m): n for n, m in model.named_modules()}
    culprit_mod, culprit_line = None, None
    tb = exc.__traceback__
    for frame, lineno in traceback.walk_tb(tb):
        self_obj = frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module) and id(self_obj) in modules:
            culprit_mod = (modules[id(self_obj)] or "<root>", type(self_obj).__name__)
            culprit_line = f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}"
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if len(first) > 400:
        first = first[:400] + " …"
    if eager_fails:
        hint = ("the model's own forward fails on these inputs too, without torch.export: this is not a capture "
                "problem — check the model's config (e.g. head counts and dimensions that must agree) and the "
                "example inputs.")
    elif re.search(r"data.dependent|GuardOnDataDependent|Could not guard|Could not extract specialized integer",
                 text, re.I):
        hint = ("the model branches on the *values* of a tensor (data-dependent control flow). "
                "Rewrite that branch with torch.cond / torch.where, or move it outside forward.")
    elif "pytree" in text and "not a known type" in text:
        hint = ("the model returns an object torch.export cannot flatten (often a KV cache): "
                "pass use_cache=False in example_kwargs, or register the type with torch.utils._pytree.")
    elif "Constraints violated" in text or "specialized" in text:
        hint = "a dimension graphadapt made dynamic is fixed by the model; try dynamic=False."
    else:
        hint = "check the example inputs match the model's forward signature, or try dynamic=False."
    where = ""
    if culprit_mod:
        where = f" in module `{culprit_mod[0]}` ({culprit_mod[1]})"
        if culprit_line:
            where += f" at {culprit_line}"
    head = (f"{type(model).__name__}'s own forward fails (eager, without torch.export)" if eager_fails
            else f"torch.export could not capture {type(model).__name__}")
    return (f"{head}{where}: "
            f"{type(exc).__name__}: {first}\nWhat to try: {hint}"
            "\n(Set GRAPHADAPT_DEBUG=1 to see torch.export's own log.)")


# --------------------------------------------------------------------------- module
_SHARED_ON_COPY = ("source_config",)


class CapturedModule(fx.GraphModule):
    """A captured model: callable like the original, movable, with a train/eval switch.

    ``train()``/``eval()`` flip the ``train`` flag of every captured ``aten.dropout``
    (torch.export records dropout with the capture-time mode baked in) and of
    every submodule (adapters). ``.to(device/dtype)`` re-targets pinned nodes.
    """

    _graphadapt_attrs = ("input_names", "constant_inputs", "dynamic_dims", "source_class", "_example_inputs",
                         "source_config", "_compute_dtype", "_compute_device", "decoder_cache", "static_axes",
                         "baked_inputs")

    def _init_capture_state(self, *, input_names, dynamic_dims, example_inputs, source,
                            dtype, device):
        self.input_names = [k for k in input_names if isinstance(example_inputs[k], torch.Tensor)]
        self.constant_inputs = {k: v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
        self.dynamic_dims = dynamic_dims
        self._example_inputs = example_inputs
        self.source_class = f"{type(source).__module__}.{type(source).__qualname__}"
        self.source_config = getattr(source, "config", None)
        self._compute_dtype = dtype
        self._compute_device = device
        self.training = False

    # -- signature
    @property
    def config(self):
        return self.source_config

    def example_inputs(self) -> dict[str, Any]:
        """Fresh copies of the example kwargs used at capture, on the module's device."""
        dev = self._compute_device
        out = {}
        for k, v in self._example_inputs.items():
            if not isinstance(v, torch.Tensor):
                continue  # captured constants are filled in by the call hook
            v = v.clone().to(dev)
            out[k] = v.to(self._compute_dtype) if v.is_floating_point() else v
        return out

    # -- modes
    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        changed = False
        for n in self.graph.nodes:
            if n.op == "call_function" and n.target == aten.dropout.default:
                x, p, _ = n.args
                if n.args[2] != mode:
                    n.args = (x, p, mode)
                    changed = True
        if changed:
            self.recompile()
        self.training = mode
        for m in self.children():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- compiled path (graphadapt/compiling.py)
    def compile(self, **torch_compile_kwargs):
        """Run the captured graph through ``torch.compile`` from now on (in place; returns the model).

        Keyword arguments go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ``fullgraph`` — True by
        default: the captured graph compiles as one graph or raises). The input checks stay eager; one compiled
        graph is kept per graph this model runs (merge/unmerge, train/eval, a composition change), and batch
        and sequence axes stay dynamic. :meth:`uncompile` goes back to eager. See docs/deployment.md."""
        return compile_module(self, **torch_compile_kwargs)

    def uncompile(self):
        """Back to eager execution of the graph (drops the compiled code)."""
        return uncompile_module(self)

    # -- moves
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        ref = next((p for p in self.parameters() if p.is_floating_point()), None)
        if ref is None:
            ref = next((b for b in self.buffers() if b.is_floating_point()), None)
        if ref is not None and (ref.dtype != self._compute_dtype or ref.device != self._compute_device):
            self._compute_dtype, self._compute_device = ref.dtype, ref.device
            retarget(self, ref.device, ref.dtype)
        return out

    def __deepcopy__(self, memo):
        import warnings

        with warnings.catch_warnings():  # torch's own TreeSpec deprecation inside GraphModule deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            res = super().__deepcopy__(memo)
        for a in self._graphadapt_attrs + ("_in_spec", "_out_spec"):
            if a in self.__dict__:
                # the config is shared, not copied
                setattr(res, a, self.__dict__[a] if a in _SHARED_ON_COPY else copy.deepcopy(self.__dict__[a], memo))
        res.training = self.training
        res.register_forward_pre_hook(_check_inputs_hook, with_kwargs=True)  # Module.__init__ dropped it
        return res

    def __reduce__(self):  # pickling a GraphModule drops our state: refuse clearly instead
        raise TypeError("graphadapt modules are not picklable; save adapters with "
                        "graphadapt checkpoints (safetensors) and re-apply on the base model.")


class SignatureMiss(TypeError):
    """A call that does not fit the captured signature (an adapted model then captures a variant for it)."""

    def __init__(self, message: str, module=None):
        super().__init__(message)
        self.module = module


def _check_inputs_hook(module: CapturedModule, args, kwargs):
    """Fill captured constants (``use_cache=False``), name unknown or missing inputs clearly."""
    names = module.input_names
    twice = [k for k in names[:len(args)] if k in kwargs]
    if twice:  # Python's own rule for a call: never silently pick one of the two values
        raise TypeError(f"got multiple values for argument {twice[0]!r} (positionally and by keyword)")
    args, kwargs = check_boundary(module, args, kwargs)  # graphadapt.contract: inputs named, converted, checked
    given = set(names[:len(args)]) | set(kwargs)
    unknown = [k for k in kwargs if k not in names and k not in module.constant_inputs]
    if unknown and module.__dict__.get("baked_inputs"):  # bound into the graph at capture: drop if equal
        baked = module.baked_inputs
        for k in [k for k in unknown if k in baked and kwargs[k] == baked[k]]:
            kwargs = {a: b for a, b in kwargs.items() if a != k}
            unknown.remove(k)
    what = f"this graphadapt model (captured from {module.source_class.rsplit('.', 1)[-1]})"
    positional = module.__dict__.get("_positional_names")
    if args and positional is not None and names[:len(args)] != positional[:len(args)]:
        raise SignatureMiss(f"{what}: positional inputs bind to {positional[:len(args)]}, not to the captured "
                            f"{names[:len(args)]}", module)
    if unknown or len(args) > len(names):
        extra = unknown or [f"{len(args)} positional arguments"]
        raise SignatureMiss(
            f"{what} takes the tensor inputs it was captured with, {names}; got unexpected {extra}. "
            f"Capture them too: graphadapt.apply(model, spec, example_kwargs={{..., {extra[0]!r}: <example>}}).",
            module)
    missing = [k for k in names if k not in given or (k in kwargs and kwargs[k] is None)]
    if not missing and args and any(a is None for a in args):  # None given = omitted
        missing = [k for k, a in zip(names, args) if a is None]
    if missing:
        raise SignatureMiss(f"{what} needs the inputs {names} (as captured); missing {missing}.", module)
    for k, v in module.constant_inputs.items():
        if k in kwargs and kwargs[k] != v:
            raise SignatureMiss(f"{k}={kwargs[k]!r} differs from the value captured ({v!r}), which is "
                                "baked into the graph; re-capture with the value you need.", module)
    kwargs = {**dict(zip(names, args)), **kwargs, **module.constant_inputs}
    for k, fixed in getattr(module, "static_axes", {}).items():
        v = kwargs.get(k)
        if not isinstance(v, torch.Tensor):
            continue
        bad = v.dim() != fixed["rank"] or any(v.shape[a] != n for a, n in fixed.items() if a != "rank")
        if bad:
            want = ["*" if a not in fixed else str(fixed[a]) for a in range(fixed["rank"])]
            raise CaptureError(
                f"{k} has shape {tuple(v.shape)} but {what} accepts only [{', '.join(want)}] (* = any size): "
                "those sizes were fixed at capture (dynamic=False, or the model specialised them). "
                "Re-capture with dynamic=True and example inputs of the sizes you need.")
    return (), kwargs


def _export(model: nn.Module, export_kwargs: dict, dyn_spec, baked: dict, own_forward, was_training: bool):
    """``torch.export.export`` of ``model`` (eval mode, no grad, ``baked`` bound into forward): (program, quantized)."""
    try:
        model.eval()
        if baked:  # non-tensor inputs landing in forward's **kwargs: bound, not exported as inputs
            model.forward = functools.partial(own_forward or type(model).forward.__get__(model), **baked)
        with torch.no_grad(), quiet_torch_logs(), opaque_quantized_linears(model) as quantized:
            programs.stats["traced"] += 1
            ep = torch.export.export(model, (), export_kwargs, dynamic_shapes=dyn_spec, strict=False)
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable CaptureError
        eager = _eager_failure(model, export_kwargs)
        raise CaptureError(_describe_failure(model, eager or e, eager_fails=eager is not None)) from e
    finally:
        if baked:
            if own_forward is None:
                del model.forward
            else:
                model.forward = own_forward
        model.train(was_training)
    return ep, quantized


def _rewrap_parameters(gm: fx.GraphModule) -> None:
    """Give the captured module its own Parameter objects over the same storage."""
    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(p.data, requires_grad=p.requires_grad)


@serialised
def capture(model: nn.Module, example_inputs: tuple | None = None,
            example_kwargs: Mapping[str, Any] | None = None, dynamic: bool = True,
            cls: type[CapturedModule] = CapturedModule,
            dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
            program_cache: bool | None = None) -> CapturedModule:
    """Capture ``model`` with torch.export into a :class:`CapturedModule`.

    Positional ``example_inputs`` are bound to names from the model's forward
    signature. Without inputs they are synthesised from ``model.config``.
    Batch and sequence dims are dynamic unless ``dynamic=False``; ``dynamic_axes``
    (``{input: {axis: name}}``, or the model's ``graphadapt_dynamic_axes``) replaces that
    default choice (e.g. a KV cache's past axis).
    Raises :class:`CaptureError` naming the failing module and what to try.

    ``program_cache``: None (default) uses the on-disk program cache only when ``GRAPHADAPT_CACHE`` names a
    directory; True uses it (default directory unless the variable names one); False never reads or writes it
    (:mod:`graphadapt.program_cache`).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}.")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise CaptureError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if not isinstance(dynamic, bool):
        raise CaptureError(f"dynamic must be True or False, got {dynamic!r}")
    if program_cache is not None and not isinstance(program_cache, bool):
        raise CaptureError(f"program_cache must be True, False or None, got {program_cache!r}")
    kwargs: dict[str, Any] = dict(example_kwargs or {})
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        try:
            sig = inspect.signature(model.forward)
            bound = sig.bind_partial(*example_inputs)
        except TypeError as e:
            raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from e
        kwargs = {**bound.arguments, **kwargs}
    if not kwargs:
        kwargs = synthesize_inputs(model)
    elif "use_cache" not in kwargs and _takes_use_cache(model):
        kwargs["use_cache"] = False
    spec, dim_names = _dynamic_shapes(kwargs, dynamic)
    dynamic_axes = dynamic_axes if dynamic_axes is not None else getattr(model, "graphadapt_dynamic_axes", None)
    if dynamic and dynamic_axes is not None:
        dim_names = {k: dict(v) for k, v in dynamic_axes.items() if v}
        spec = {k: ({a: torch.export.Dim.AUTO for a in dim_names.get(k, {})} or None) for k in kwargs}
    elif dynamic:  # the default choice of axes: size-1 examples would be specialised, widen them
        kwargs = _widen_unit_axes(kwargs, dim_names)
    was_training = model.training
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    baked = _baked_inputs(model, kwargs)
    own_forward = model.__dict__.get("forward")
    export_kwargs = {k: v for k, v in kwargs.items() if k not in baked}
    dyn_spec = _nest_var_keyword(model, {k: v for k, v in spec.items() if k not in baked}) if dynamic else None
    root = programs.cache_root(program_cache)
    key = None
    if root is not None and quantized_modules(model):  # packed weights are swapped during the trace: not cached
        root = None
    if root is not None:  # the key describes the model before capture touches it (forward, mode)
        key = programs.program_key(model, export_kwargs, {"dynamic": dynamic, "dynamic_shapes": repr(dyn_spec),
                                                               "baked": repr(baked)})
        if isinstance(key, str):
            programs.stats["uncacheable"] += 1
            key = None
    ep = programs.load_program(root, *key, model, export_kwargs) if key is not None else None
    quantized = {}
    if ep is None:
        ep, quantized = _export(model, export_kwargs, dyn_spec, baked, own_forward, was_training)
        if key is not None:
            programs.store_program(root, *key, ep, model)
    relax_derived_minimums(ep)  # an axis derived from two dynamic ones must not inherit a minimum of 4
    unlifted = ep.module()
    gm = cls(unlifted, unlifted.graph)
    for a in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, a):
            setattr(gm, a, getattr(unlifted, a))
    # the unlifted module's codegen references these; GraphModule(root, graph) keeps only get_attr targets
    _rewrap_parameters(gm)
    install_quantized_weights(gm, quantized)  # packed 4-bit bases: dequantizing weights (graphadapt.quantized)
    tensor_inputs = [k for k, v in kwargs.items()]
    gm._init_capture_state(input_names=tensor_inputs, dynamic_dims=dim_names,
                           example_inputs={k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                           for k, v in kwargs.items()},
                           source=getattr(model, "graphadapt_source", model), dtype=dtype, device=device)
    gm.static_axes = _static_axes(unlifted)
    gm.baked_inputs = baked
    gm.constant_inputs = {k: v for k, v in gm.constant_inputs.items() if k not in baked}
    run_pass("make_portable", make_portable, gm, dtype, device)
    gm.register_forward_pre_hook(_check_inputs_hook, with_kwargs=True)
    return gm
