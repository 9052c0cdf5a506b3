"""The input contract of an adapted model, checked at its boundary before torch's own guards.

Two parts:

* :func:`relax_derived_minimums` — a capture-time fix. torch.export gives every dynamic axis a range
  of ``[2, ∞)`` (sizes 0 and 1 are specialised away, and the unlifted module does not check that
  ``2``); an axis *derived* from two of them (a KV cache's ``attention_mask`` covers past + new
  tokens) inherits ``[4, ∞)``, which the unlifted module *does* check — so ``generate()`` refused
  every prompt shorter than 4 tokens (``Guard failed: attention_mask.size()[1] >= 4``). Lower
  bounds above 2 that come from that arithmetic are lowered to 2 (unchecked, like every other
  axis); the model's real requirements are checked below, by name.
* :func:`check_call` — every call of an adapted model: inputs converted (Python lists, numpy
  arrays) or refused, ranks, dtypes, batch and sequence agreement between inputs, empty batch or
  sequence, token ids within the vocabulary, sequence within the model's positions; each error
  names the input and the fix.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import GraphAdaptError


class InputError(GraphAdaptError, ValueError):
    """An input to an adapted model breaks its contract; the message names the input and the fix."""


class UnknownArgument(InputError, TypeError):
    """A keyword the model's forward does not take (a ``TypeError``, as Python's own for a call)."""


# ----------------------------------------------------------------------------- capture
def relax_derived_minimums(ep) -> None:
    """Lower every range constraint's lower bound above 2 to 2 (see the module docstring)."""
    try:
        from torch.utils._sympy.value_ranges import ValueRanges
    except ImportError:  # another torch layout: leave the guards as they are
        return
    rc = getattr(ep, "_range_constraints", None)
    if not isinstance(rc, dict):
        return
    for sym, vr in list(rc.items()):
        try:
            lower = int(vr.lower)
        except (TypeError, ValueError):
            continue
        if lower > 2:
            rc[sym] = ValueRanges(2, vr.upper)


# ----------------------------------------------------------------------------- calls
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx", "max_sequence_length")


def max_positions(config) -> int | None:
    """The longest sequence a model with ``config`` embeds positions for (None: no learned limit)."""
    if config is None or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    if getattr(config, "position_biased_input", True) is False or any(
            getattr(config, k, None) is not None for k in ("rope_theta", "rope_scaling", "rotary_dim",
                                                           "relative_attention_num_buckets")):
        return None  # positions enter as rotations or relative biases: no table to index past
    if getattr(config, "model_type", None) in ("t5", "mt5", "umt5", "llama", "mistral", "qwen2", "qwen3", "gemma",
                                                 "gemma2", "gemma3", "phi3", "mixtral"):
        return None  # relative or rotary positions: no embedding table to index past
    for k in _POSITION_KEYS:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            offset = 2 if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert") else 0
            return v - offset
    return None


def _as_tensor(name: str, value: Any, example: torch.Tensor):
    if isinstance(value, torch.Tensor) or value is None:
        return value
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InputError(f"{name} is a numpy array of Python objects; pass numbers (e.g. a list of equal-length "
                             "lists of token ids) or a torch.Tensor")
        return torch.from_numpy(value).to(example.device)
    if isinstance(value, (list, tuple)):
        try:
            t = torch.tensor(value, device=example.device)
        except (ValueError, TypeError, RuntimeError) as e:
            raise InputError(f"{name} is a {type(value).__name__} that is not a rectangular array of numbers "
                             f"({e}); pad every row to the same length (and pass attention_mask), or pass a "
                             "torch.Tensor") from None
        if t.dtype == torch.float64 and example.dtype != torch.float64 and example.is_floating_point():
            t = t.to(example.dtype)
        return t
    return value  # other objects: the captured graph's own checks name them


def check_vocab(name: str, ids, cfg, what: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not ids.numel():
        return
    vocab = getattr(cfg, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    outside = (ids >= vocab) | (ids < 0)
    if bool(outside.any()):  # one host sync per call
        bad = int(ids[outside].reshape(-1)[0])
        raise InputError(f"{name} holds token id {bad}, outside the vocabulary of {what} (0 … {vocab - 1}); "
                         "was it tokenized with another model's tokenizer?")


# keywords transformers' forward decorators (can_return_tuple, check_model_inputs) take before **kwargs
_DECORATOR_KWARGS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "use_cache"})


def _typed_kwargs(module) -> set[str] | None:
    """The keys a source forward's ``**kwargs: Unpack[SomeTypedDict]`` accepts (None: any)."""
    import typing

    src = module.__dict__.get("_source_model")
    if src is None:
        return None
    try:
        hints = typing.get_type_hints(type(src).forward, include_extras=True)
        import inspect

        var = next(p.name for p in inspect.signature(type(src).forward).parameters.values() if p.kind == p.VAR_KEYWORD)
        hint = hints.get(var)
    except Exception:  # noqa: BLE001 - unresolvable annotations: accept any keyword
        return None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Unpack and args and typing.is_typeddict(args[0]):
        keys: set[str] = set()
        for klass in getattr(args[0], "__mro__", (args[0],)):  # raw annotations: their types need not resolve
            keys |= set(getattr(klass, "__annotations__", {}))
        return keys
    return None


def check_boundary(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward pre-hook's first step: misspelled arguments named, then :func:`check_call` on every input
    whose name is known (positional ones too when they bind to the captured names)."""
    names = list(module.input_names)
    known = set(names) | set(module.constant_inputs) | set(module.__dict__.get("baked_inputs") or {})
    sig = module.__dict__.get("_call_signature")
    explicit = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and p.name != "self"] if sig is not None else list(names)
    open_ended = sig is not None and any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    for k in kwargs:
        if k in known or k in explicit:
            continue
        import difflib

        typed = _typed_kwargs(module) if open_ended else None  # transformers' **kwargs: Unpack[TypedDict]
        if typed is not None and (k in typed or k in _DECORATOR_KWARGS):
            continue
        close = difflib.get_close_matches(k, sorted(set(explicit) | set(names) | set(typed or ())), n=1, cutoff=0.75)
        if close or not open_ended or typed is not None:
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownArgument(f"unknown argument {k!r} for {module.source_class.rsplit('.', 1)[-1]}.forward{hint} "
                             f"(it takes {explicit})")
    positional = module.__dict__.get("_positional_names")
    bind = not args or positional is None or names[:len(args)] == list(positional[:len(args)])
    bound = {**(dict(zip(names, args)) if bind else {}), **kwargs}
    checked = check_call(module, bound)
    if bind:
        args = tuple(checked[n] for n in names[:len(args)])
    return args, {k: checked.get(k, v) for k, v in kwargs.items()}


def check_generate(model, input_ids, attention_mask, max_new_tokens) -> tuple:
    """``generate``'s inputs: tensors (lists and numpy arrays converted), 2-D ``[batch, sequence]`` integer
    ids within the vocabulary, at least one row and one token, and room for ``max_new_tokens`` positions."""
    if isinstance(model, tuple):
        model = model[-1]
    ex = torch.zeros(1, 1, dtype=torch.long, device=getattr(model, "_compute_device", None) or "cpu")
    input_ids = _as_tensor("input_ids", input_ids, ex)
    attention_mask = _as_tensor("attention_mask", attention_mask, ex)
    what = f"this graphadapt model (captured from {model.source_class.rsplit('.', 1)[-1]})"
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"generate needs input_ids as a tensor [batch, sequence] of token ids, got "
                         f"{type(input_ids).__name__}")
    if input_ids.dim() != 2:
        fix = "add the batch axis: input_ids[None]" if input_ids.dim() == 1 else "pass [batch, sequence]"
        raise InputError(f"generate needs 2-D input_ids [batch, sequence], got shape {tuple(input_ids.shape)}; {fix}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got {input_ids.dtype}; pass input_ids.long()")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"generate got input_ids of shape {tuple(input_ids.shape)}: at least one row and one "
                         "prompt token are needed (start from the model's BOS token for an empty prompt)")
    if isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}; they must match (one mask entry per token)")
    cfg = model.__dict__.get("source_config")
    check_vocab("input_ids", input_ids, cfg, what)
    limit = None if getattr(cfg, "is_encoder_decoder", False) else max_positions(cfg)  # decoder positions differ
    if limit is not None and isinstance(max_new_tokens, int) and input_ids.shape[1] + max_new_tokens > limit:
        raise InputError(f"a prompt of {input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} needs "
                         f"{input_ids.shape[1] + max_new_tokens} positions, but {what} has {limit} "
                         f"(config.max_position_embeddings); lower max_new_tokens to "
                         f"{max(limit - input_ids.shape[1], 0)} or shorten the prompt")
    return input_ids, attention_mask


def _blocks(block):
    yield block
    for c in getattr(block, "children", ()):
        if not isinstance(c, str):
            yield from _blocks(c)


def check_export(model, inputs: dict, dynamic: bool, error: type[Exception]) -> None:
    """Before an export starts: the example holds every input the model was captured with, and a composition
    that fixes the batch size (``batch_sizes``) is not exported with a dynamic batch."""
    names = model.__dict__.get("input_names") if isinstance(model, torch.nn.Module) else None
    if names:
        missing = [n for n in names if inputs.get(n) is None]
        if missing:
            raise error(f"example_inputs lacks {missing} (the model was captured with {list(names)}, and the export "
                        f"traces that call); add {', '.join(f'{m!r}' for m in missing)} to example_inputs, e.g. "
                        "attention_mask=torch.ones_like(input_ids)")
    comp = getattr(getattr(model, "spec", None), "composition", None)
    for b in (_blocks(comp) if comp is not None else ()):
        sizes = getattr(b, "batch_sizes", None)
        if sizes is None:
            continue
        total = sum(sizes)
        if dynamic:
            raise error(f"the active composition {comp} splits the batch into fixed slices {list(sizes)}, so the "
                        f"exported graph only fits batches of {total} rows: export it with dynamic=False and example "
                        f"inputs of {total} rows, or set_active(...) a setup without {type(b).__name__} first")
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.dim() and k in (names or ()) and v.shape[0] != total:
                raise error(f"{k} has {v.shape[0]} rows but the active composition {comp} splits batches of "
                            f"{total} rows ({list(sizes)}); give example inputs of {total} rows")


def _added_positions(model) -> int:
    """Positions active adapters prepend before the position embedding (an adapter module's ``added_positions``)."""
    records = model.__dict__.get("adapter_records") or ()
    cached = model.__dict__.get("_position_adders")
    if cached is None or cached[0] is not records:  # resolved once per set of records, not on every call
        adders = []
        for r in records:
            try:
                m = model.get_submodule(r.target)
            except AttributeError:
                continue
            if getattr(m, "added_positions", 0):
                adders.append(m)
        cached = model.__dict__["_position_adders"] = (records, adders)
    return sum(int(getattr(m, "added_positions", 0) or 0) for m in cached[1] if getattr(m, "active", True))


def check_call(model, kwargs: dict) -> dict:
    """``kwargs`` (a call bound to the captured input names) checked against the capture; lists and numpy
    arrays become tensors. Raises :class:`InputError`."""
    examples = model.__dict__.get("_example_inputs") or {}
    dims = model.__dict__.get("dynamic_dims") or {}
    static = model.__dict__.get("static_axes") or {}
    what = f"this graphadapt model (captured from {model.source_class.rsplit('.', 1)[-1]})"
    out = dict(kwargs)
    sizes: dict[str, tuple[int, str]] = {}
    for k, v in kwargs.items():
        ex = examples.get(k)
        if not isinstance(ex, torch.Tensor):
            continue
        v = out[k] = _as_tensor(k, v, ex)
        if not isinstance(v, torch.Tensor):
            continue
        if v.dim() != ex.dim():
            axes = dims.get(k, {})
            layout = ", ".join(axes.get(a, f"{ex.shape[a]}" if a in static.get(k, {}) else "*")
                               for a in range(ex.dim()))
            fix = (f"add the batch axis: {k}[None]" if v.dim() == ex.dim() - 1 else
                   f"flatten the extra axes (e.g. {k}.reshape(-1, {k}.shape[-1]))" if v.dim() > ex.dim() else
                   f"give it the shape [{layout}]")
            raise InputError(f"{k} must be {ex.dim()}-D [{layout}] for {what}, got shape {tuple(v.shape)}; {fix}")
        if not ex.is_floating_point() and ex.dtype != torch.bool and v.is_floating_point():
            raise InputError(f"{k} must hold integers ({ex.dtype}, like the capture's example), got {v.dtype}; "
                             f"pass {k}.long() if the values are token ids, or the integer tensor your tokenizer "
                             "returned")
        if ex.is_floating_point() and not v.is_floating_point():
            raise InputError(f"{k} must be a floating-point tensor (captured as {ex.dtype}), got {v.dtype}; "
                             f"convert it with {k}.float()")
        for a, axis in dims.get(k, {}).items():
            n = v.shape[a]
            if n == 0 and not axis.startswith(("past", "total")):  # an empty KV cache is the first step
                kind = "rows (batch size 0)" if axis == "batch" else f"positions on its {axis} axis"
                raise InputError(f"{k} has no {kind}, shape {tuple(v.shape)}: there is nothing to compute; "
                                 "call the model with at least one row and one token")
            if axis in sizes and sizes[axis][0] != n and not axis.startswith(("total", "past")):
                other, m = sizes[axis][1], sizes[axis][0]
                raise InputError(f"{k} has {axis} size {n} but {other} has {m} (shapes {tuple(v.shape)} and "
                                 f"{tuple(out[other].shape)}); every input of one call covers the same {axis}: "
                                 f"{'pad or trim them to one length' if axis != 'batch' else 'give each the same rows'}")
            sizes.setdefault(axis, (n, k))
    cfg = model.__dict__.get("source_config")
    for name in ("input_ids", "decoder_input_ids"):
        check_vocab(name, out.get(name), cfg, what)
    limit = max_positions(cfg)
    seq = sizes.get("total_sequence") or sizes.get("sequence")
    extra = _added_positions(model)
    if limit is not None and seq is not None and seq[0] + extra > limit:
        more = f" (+{extra} positions the adapters prepend)" if extra else ""
        raise InputError(f"{seq[1]} has {seq[0]} positions{more} but {what} embeds at most {limit} positions "
                         f"(config.max_position_embeddings); truncate the input to {limit - extra} tokens "
                         "(tokenizer(..., truncation=True, max_length=...)) or split it")
    return out


__all__ = ["InputError", "UnknownArgument", "check_call", "check_boundary", "check_generate", "check_export", "relax_derived_minimums", "max_positions"]
