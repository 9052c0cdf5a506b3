"""The floating dtypes graphadapt exports and writes, by name (``"fp16"`` → ``torch.float16``)."""

from __future__ import annotations

import torch

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


__all__ = ["DTYPES", "DTYPE_NAMES", "parse_dtype"]
