"""IA3 as one module that a graph pass calls at a linear site (PEFT semantics).

Transform (one site, base op ``y = x W^T + b``)::

    before:  y  = linear(x, W, b)
    after:   y' = IA3Module(x, y, W, b)

* output scaling (``feedforward=False``): ``y' = l ⊙ y`` on the channels the module owns
  (all of them, or ``out_slice`` of a fused projection such as GPT-2's ``c_attn``; the
  other channels pass through bit-identical); ``l`` is ``ia3_l`` [out, 1].
* feedforward (input) scaling: ``y' = y + (x ⊙ (l - 1)) W_rows^T`` on the owned channels,
  which equals ``linear(x ⊙ l, W, b)`` (PEFT's ``base_layer(x * l)``) while keeping what
  earlier adapters stacked on the same site added to ``y``; ``l`` is ``ia3_l`` [1, in].

AdapterHub's IA3 (``LoRAConfig(composition_mode="scale")``) scales outputs only, by
``alpha · l`` (``alpha`` folds like ``l``), or with ``use_gating`` by ``g · l`` where the gate
``g = mean_seq sigmoid(x G^T + g_b)`` (one scalar per example, from the site input) replaces
``alpha`` — not mergeable. AdapterHub's ``lora_B`` [out, 1] is ``ia3_l``.

``ia3_l`` has PEFT's shape, so ``base_model.model.<path>.ia3_l.<adapter>`` copies directly.
``fold`` gives ``(W', b')``: output scaling multiplies the owned rows of ``W`` and ``b`` by
``l``; feedforward scaling multiplies the input columns of the owned rows (bias unchanged).
GPT-2 ``Conv1D`` weights (``fan_in_fan_out``, ``[in, out]``) are handled in their layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import MergeError, SpecError
from graphadapt.methods.gates import InputGate
from graphadapt.methods.sliced import SlicedSiteModule
from graphadapt.passes.modules import RoutedForm

__all__ = ["IA3Module"]


class IA3Module(SlicedSiteModule):
    """Learned per-channel scaling of one linear site: ``(x, y, W, b) → y'``.

    Args:
        in_features, out_features: the site's sizes (``out_features`` is the slice width
            for a fused projection).
        feedforward: scale the input (``ia3_l`` [1, in]) instead of the output ([out, 1]).
        fan_in_fan_out: base weight is ``[in, out]`` (GPT-2 ``Conv1D``).
        out_slice, total_out: this module owns channels ``[start, end)`` of a
            ``total_out`` wide output.
        alpha: constant factor on ``ia3_l`` (AdapterHub's IA3 alpha).
        use_gating: AdapterHub's gate replaces ``alpha`` (output scaling only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        feedforward: bool,
        fan_in_fan_out: bool = False,
        out_slice: tuple[int, int] | None = None,
        total_out: int | None = None,
        out_rows: tuple[int, ...] | None = None,
        alpha: float = 1.0,
        use_gating: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.active = True
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.feedforward = bool(feedforward)
        shape = (1, in_features) if self.feedforward else (out_features, 1)
        # Ones (identity) without RNG; the IA3 plugin (graphadapt.methods.ia3) redraws when init_ia3_weights=False.
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        self.alpha = float(alpha)
        if use_gating and self.feedforward:
            raise SpecError("a gated IA3 module scales its output; feedforward must be False", field="use_gating")
        self.gate = InputGate(in_features, dtype=dtype, device=device) if use_gating else None

    @property
    def mergeable(self) -> bool:
        """False when gated: the gate depends on the input."""
        return self.gate is None

    @property
    def merge_refusal(self) -> str | None:
        return "gated IA3: its gate depends on the input, so it cannot fold into a weight" if self.gate else None

    def _scale(self) -> Tensor:
        return self.ia3_l if self.alpha == 1.0 else self.ia3_l * self.alpha

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``(x [..., in], y [..., total_out], W, b) → y'`` (see module docstring)."""
        if not self.active:
            return y
        if self.gate is not None:
            if x.dtype != self.ia3_l.dtype:
                x = x.to(self.ia3_l.dtype)
            return self._replace_slice(y, self._own(y) * (self.ia3_l.flatten() * self.gate(x)))
        l = self._scale()
        if not self.feedforward:
            return self._replace_slice(y, self._own(y) * l.flatten())
        if x.dtype != l.dtype:
            x = x.to(l.dtype)
        rows = self._rows(weight)
        delta = F.linear(x * (l.flatten() - 1), rows.to(l.dtype))
        return self._replace_slice(y, self._own(y) + delta)

    def routed_form(self, weight: Tensor, bias: Tensor | None = None) -> RoutedForm | None:
        """Stackable terms for per-row routing (live tensors): output scaling ``gain = l − 1``, ``shift = (l − 1) ⊙ b``;
        input scaling ``in_gain = l − 1``. None when gated or on a fused slice / ``[in, out]`` layout."""
        if self.gate is not None or self.out_slice is not None or self.out_rows is not None or self.fan_in_fan_out:
            return None
        g = self._scale().flatten() - 1
        if self.feedforward:
            return RoutedForm(in_gain=g)
        return RoutedForm(gain=g, shift=None if bias is None else g * bias)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor | None = None, *,
             base_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(W, b) → (W', b')`` (new tensors, base layout, full shape) with
        ``linear(x, W', b') == forward(x, linear(x, W, b), W, b)`` in eval mode.

        Output scaling: the owned rows of ``W`` and entries of ``b`` times ``l``.
        Feedforward: the owned rows' input columns times ``l``, ``b`` unchanged. When
        ``weight`` already holds earlier merged adapters, give the un-merged ``base_weight``:
        feedforward then adds ``W0 ⊙ (l - 1)`` (what the forward adds) instead of rescaling
        the earlier adapters' updates.
        """
        if self.gate is not None:
            raise MergeError("cannot fold a gated IA3 module: its gate depends on the input; keep it unmerged")
        new_weight = weight.detach().clone()
        new_bias = None if bias is None else bias.detach().clone()
        l = self._scale().detach().to(dtype=weight.dtype, device=weight.device)
        rows = self._rows(new_weight)
        if not self.feedforward:
            rows.mul_(l)  # [out, 1] broadcasts over the input columns
            self._commit_rows(new_weight, rows)
            if new_bias is not None:
                part = self._bias_slice(new_bias)
                part.mul_(l.flatten().to(new_bias.dtype))
                self._commit_bias(new_bias, part)
            return new_weight, new_bias
        if base_weight is None or torch.equal(base_weight, weight):
            rows.mul_(l)  # [1, in] broadcasts over the rows
        else:
            w0 = self._rows(base_weight.detach().to(dtype=weight.dtype, device=weight.device))
            rows.add_(w0 * (l - 1))
        self._commit_rows(new_weight, rows)
        return new_weight, new_bias

    # ------------------------------------------------------------------ swap slots (passes.modules.SwappableModule)
    swap_refusal = None

    def swap_rank(self) -> None:
        return None  # a vector: nothing to pad

    def swap_signature(self) -> tuple:
        return ("ia3", self.in_features, self.out_features, self.feedforward, self.gate is not None,
                self.fan_in_fan_out, self.out_slice, self.total_out, self.out_rows)

    @torch.no_grad()
    def swap_tensors(self, rank: int | None = None) -> dict[str, Tensor]:
        """Slot form: ``alpha · l`` (``l`` when gated: the gate replaces ``alpha``), plus the gate."""
        out = {"ia3_l": (self.ia3_l if self.gate is not None else self._scale()).detach().clone()}
        if self.gate is not None:
            out.update({f"gate.{k}": v.detach().clone() for k, v in self.gate.named_parameters()})
        return out

    @torch.no_grad()
    def make_swap_slot_(self, rank: int | None = None) -> None:
        """In place: ``alpha`` folded into ``l``; the same function."""
        self.ia3_l = nn.Parameter(self.swap_tensors()["ia3_l"], requires_grad=self.ia3_l.requires_grad)
        if self.gate is None:
            self.alpha = 1.0

    def adapterhub_tensors(self) -> dict[str, nn.Parameter]:
        """AdapterHub ``loras`` key → parameter (its IA3 vector is ``lora_B`` [out, 1]; see
        :mod:`graphadapt.methods.adapterhub_loras`)."""
        out = {"lora_B": self.ia3_l}
        if self.gate is not None:
            out["gate.weight"] = self.gate.weight
            out["gate.bias"] = self.gate.bias
        return out

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"feedforward={self.feedforward}"]
        if self.alpha != 1.0:
            parts.append(f"alpha={self.alpha:g}")
        if self.gate is not None:
            parts.append("use_gating=True")
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        if self.out_slice is not None:
            parts.append(f"out_slice={self.out_slice}, total_out={self.total_out}")
        return ", ".join(parts)
