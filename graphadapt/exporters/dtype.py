"""Low-precision copies of a model for export: ``model → deepcopy(model).to(fp16|bf16)``.

A captured graph has the capture dtype baked in; the copy's graph is rewritten by
:func:`graphadapt.passes.retarget_dtype.retarget_graph_dtype`, which keeps HF's fp32
islands (norm statistics, rotary angles) where the graph shows them.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx

from graphadapt.passes.portability import drop_dtype_pins
from graphadapt.passes import run_pass
from graphadapt.passes.retarget_dtype import retarget_dtype_pass

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp16"``/``"float16"``/``torch.float16`` → ``torch.float16`` (fp32, fp16, bf16 only)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of 'fp32', 'fp16', 'bf16' (or the torch dtype), got {dtype!r}")


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Cast floating tensors (``pixel_values``) to ``dtype``; integer ids and masks stay as they are."""
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


def converted_copy(model: torch.nn.Module, dtype: torch.dtype, example_inputs: dict[str, Any]) -> torch.nn.Module:
    """A deep copy of ``model`` in ``dtype`` (``model`` itself when already there); never converts in place."""
    if _float_dtypes(model) <= {dtype}:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch pytree LeafSpec deprecation on deepcopy
        clone = copy.deepcopy(model)
    src = _dominant_float_dtype(model)
    if isinstance(clone, torch.fx.GraphModule):
        drop_dtype_pins(clone)  # dtype decisions belong to retarget_graph_dtype; device pins stay
    clone.to(dtype)  # nn.Module.to converts float params/buffers only; int buffers stay
    if isinstance(clone, torch.fx.GraphModule) and src != dtype:
        run_pass("retarget_dtype", retarget_dtype_pass, clone, src, dtype, cast_inputs(example_inputs, dtype))
    return clone


def _float_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _dominant_float_dtype(model: torch.nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


