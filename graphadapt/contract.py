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
            if n == 0:
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
    ids = out.get("input_ids")
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel():
        vocab = getattr(cfg, "vocab_size", None)
        lo, hi = int(ids.min()), int(ids.max())
        if isinstance(vocab, int) and (hi >= vocab or lo < 0):
            bad = hi if hi >= vocab else lo
            raise InputError(f"input_ids holds token id {bad}, outside the vocabulary of {what} (0 … {vocab - 1}); "
                             "was it tokenized with another model's tokenizer?")
    limit = max_positions(cfg)
    seq = sizes.get("sequence")
    extra = getattr(model, "prompt_positions", lambda: 0)()
    if limit is not None and seq is not None and seq[0] + extra > limit:
        more = f" (+{extra} prompt positions the adapters prepend)" if extra else ""
        raise InputError(f"{seq[1]} has {seq[0]} positions{more} but {what} embeds at most {limit} positions "
                         f"(config.max_position_embeddings); truncate the input to {limit - extra} tokens "
                         "(tokenizer(..., truncation=True, max_length=...)) or split it")
    return out


__all__ = ["InputError", "check_call", "relax_derived_minimums", "max_positions"]
