"""Shared base of adapters at a linear site that may own only a slice of a fused output.

A module built for a fused projection (GPT-2 ``c_attn``: ``[q | k | v]``) owns channels
``[start, end)`` of a ``total_out`` wide output; these helpers read its rows of the base
weight in either layout and write its result into those channels only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError


class SlicedSiteModule(nn.Module):
    """``nn.Module`` base: slice bookkeeping for modules called as ``(x, y, W, b) → y'``."""

    def _init_site(self, in_features: int, out_features: int, out_slice, total_out, fan_in_fan_out: bool) -> None:
        """Validate and store the site geometry; a slice covering the whole output is no slice."""
        if out_slice is None:
            if total_out is not None and total_out != out_features:
                raise SpecError(f"total_out={total_out} without out_slice must equal out_features={out_features}",
                                field="total_out")
            total_out = out_features
        else:
            start, end = (int(v) for v in out_slice)
            if total_out is None:
                raise SpecError("out_slice needs total_out (the fused output width)", field="total_out")
            if not 0 <= start < end <= total_out or end - start != out_features:
                raise SpecError(f"out_slice={out_slice} must satisfy 0 <= start < end <= total_out={total_out} "
                                f"and end - start == out_features={out_features}", field="out_slice")
            out_slice = None if (start, end) == (0, total_out) else (start, end)
        self.in_features = in_features
        self.out_features = out_features
        self.total_out = total_out
        self.out_slice = out_slice
        self.fan_in_fan_out = bool(fan_in_fan_out)

    def _rows(self, weight: Tensor) -> Tensor:
        """Base weight (either layout, full fused shape) → this module's rows as an
        ``[out_features, in]`` view (writes through, so fold can update a clone in place)."""
        w = weight.t() if self.fan_in_fan_out else weight
        if self.out_slice is not None:
            w = w[self.out_slice[0]: self.out_slice[1]]
        return w

    def _bias_slice(self, bias: Tensor) -> Tensor:
        return bias if self.out_slice is None else bias[self.out_slice[0]: self.out_slice[1]]

    def _own(self, y: Tensor) -> Tensor:
        """This module's channels of ``y [..., total_out]``."""
        return y if self.out_slice is None else y[..., self.out_slice[0]: self.out_slice[1]]

    def _replace_slice(self, y: Tensor, mid: Tensor) -> Tensor:
        """``y`` with this module's channels replaced by ``mid`` (cast to ``y``'s dtype)."""
        if mid.dtype != y.dtype:
            mid = mid.to(y.dtype)
        if self.out_slice is None:
            return mid
        start, end = self.out_slice
        # cat of untouched pieces instead of an in-place slice write: stays functional
        # (autograd, torch.export) and leaves the other channels bit-identical.
        parts = ([y[..., :start]] if start > 0 else []) + [mid]
        if end < self.total_out:
            parts.append(y[..., end:])
        return torch.cat(parts, dim=-1)
