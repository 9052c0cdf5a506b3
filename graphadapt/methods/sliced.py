"""Shared base of adapters at a linear site that may own only a slice of a fused output.

A module built for a fused projection (GPT-2 ``c_attn``: ``[q | k | v]``) owns channels
``[start, end)`` of a ``total_out`` wide output; these helpers read its rows of the base
weight in either layout and write its result into those channels only.

A head-interleaved fused projection (GPT-NeoX, Falcon, Bloom: ``query_key_value`` viewed as
``(…, heads, 3, head_dim)``) gives a role an arbitrary *index set* ``out_rows`` of the fused
channels instead (in the order the role's tensor lays them out, head-major). The same helpers
then gather those channels (``index_select``) and put the result back through a fixed
permutation (``cat([mine, rest])`` then ``index_select`` with the inverse permutation): no
in-place writes, other channels bit-identical, exportable (ONNX ``Gather``). In ``fold``,
:meth:`_rows` returns a gathered copy and :meth:`_commit_rows` scatters it back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphadapt.errors import SpecError


class SlicedSiteModule(nn.Module):
    """``nn.Module`` base: slice bookkeeping for modules called as ``(x, y, W, b) → y'``."""

    def _init_site(self, in_features: int, out_features: int, out_slice, total_out, fan_in_fan_out: bool,
                   out_rows=None) -> None:
        """Validate and store the site geometry; a slice covering the whole output is no slice,
        and an index set ``out_rows`` that is an ascending contiguous range becomes a slice."""
        self.out_rows = None
        if out_rows is not None:
            rows = [int(r) for r in out_rows]
            if out_slice is not None:
                raise SpecError("give out_slice or out_rows, not both", field="out_rows")
            if total_out is None:
                raise SpecError("out_rows needs total_out (the fused output width)", field="total_out")
            if len(rows) != out_features or len(set(rows)) != len(rows) or not all(0 <= r < total_out for r in rows):
                raise SpecError(f"out_rows must be {out_features} distinct channel indices in [0, {total_out})",
                                field="out_rows")
            if rows == list(range(rows[0], rows[0] + len(rows))):
                out_slice = (rows[0], rows[0] + len(rows))
            else:
                self.out_rows = tuple(rows)
                idx = torch.tensor(rows, dtype=torch.long)
                rest = torch.tensor(sorted(set(range(total_out)) - set(rows)), dtype=torch.long)
                inv = torch.empty(total_out, dtype=torch.long)
                inv[torch.cat([idx, rest])] = torch.arange(total_out)
                # non-persistent: derived from the site, never part of a checkpoint
                self.register_buffer("_row_index", idx, persistent=False)
                self.register_buffer("_rest_index", rest, persistent=False)
                self.register_buffer("_row_inverse", inv, persistent=False)
        if out_slice is None and self.out_rows is None:
            if total_out is not None and total_out != out_features:
                raise SpecError(f"total_out={total_out} without out_slice must equal out_features={out_features}",
                                field="total_out")
            total_out = out_features
        elif self.out_rows is None:
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
        if self.out_rows is not None:
            return w.index_select(0, self._row_index.to(w.device))   # a copy: see _commit_rows
        if self.out_slice is not None:
            w = w[self.out_slice[0]: self.out_slice[1]]
        return w

    def _commit_rows(self, weight: Tensor, rows: Tensor) -> None:
        """After changing ``rows = self._rows(weight)`` in place: make ``weight`` hold them
        (already so for a slice, which is a view; scattered back for an index set)."""
        if self.out_rows is not None:
            w = weight.t() if self.fan_in_fan_out else weight
            w.index_copy_(0, self._row_index.to(w.device), rows.to(w.dtype))

    def _bias_slice(self, bias: Tensor) -> Tensor:
        if self.out_rows is not None:
            return bias.index_select(0, self._row_index.to(bias.device))
        return bias if self.out_slice is None else bias[self.out_slice[0]: self.out_slice[1]]

    def _commit_bias(self, bias: Tensor, part: Tensor) -> None:
        """Like :meth:`_commit_rows`, for ``part = self._bias_slice(bias)``."""
        if self.out_rows is not None:
            bias.index_copy_(0, self._row_index.to(bias.device), part.to(bias.dtype))

    def _own(self, y: Tensor) -> Tensor:
        """This module's channels of ``y [..., total_out]``."""
        if self.out_rows is not None:
            return y.index_select(-1, self._row_index)
        return y if self.out_slice is None else y[..., self.out_slice[0]: self.out_slice[1]]

    def _replace_slice(self, y: Tensor, mid: Tensor) -> Tensor:
        """``y`` with this module's channels replaced by ``mid`` (cast to ``y``'s dtype)."""
        if mid.dtype != y.dtype:
            mid = mid.to(y.dtype)
        if self.out_rows is not None:
            # [mine | rest] in permuted order, then back to the fused order
            return torch.cat([mid, y.index_select(-1, self._rest_index)], dim=-1).index_select(-1, self._row_inverse)
        if self.out_slice is None:
            return mid
        start, end = self.out_slice
        # cat of untouched pieces instead of an in-place slice write: stays functional
        # (autograd, torch.export) and leaves the other channels bit-identical.
        parts = ([y[..., :start]] if start > 0 else []) + [mid]
        if end < self.total_out:
            parts.append(y[..., end:])
        return torch.cat(parts, dim=-1)


def peft_inexpressible_sites(modules, records: list) -> dict[str, str]:
    """``{site: why}`` for sites PEFT's per-module formats (LoRA, IA3) cannot hold: not a whole
    ``nn.Linear`` (Conv1D, expert weights) or only part of one (a fused slice or row set)."""
    out = {}
    for r in records:
        m = modules.get(r.site)
        part = m is not None and (getattr(m, "out_slice", None) is not None or getattr(m, "out_rows", None) is not None)
        if r.layout != "linear" or part or r.num_experts:
            out[r.site] = f"a {r.layout} site" + (" (part of a fused projection)" if part else "")
    return out

