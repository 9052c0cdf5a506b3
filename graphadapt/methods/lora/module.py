"""LoRA, rsLoRA, DoRA and gated LoRA as one module that a graph pass calls at a linear site.

Transform (one site, base op ``y = x W^T + b``)::

    before:  y  = linear(x, W, b)
    after:   y' = LoRAModule(x, y, W, b)

with, for the channels the module owns (all of them, or ``out_slice`` of a fused
projection such as GPT-2's ``c_attn = [q|k|v]``):

* plain / rsLoRA: ``y' = y + s · B A dropout(x)``, ``s = alpha/r`` (rsLoRA: ``alpha/sqrt(r)``);
  with ``lora_bias`` (PEFT's): ``y' = y + s · (B A dropout(x) + b_B)``;
* DoRA (PEFT's formulation): ``f = m / ||W + s·BA||_row`` (norm detached) and
  ``y' = y + (f - 1) ⊙ (y - b) + f ⊙ s · B A x``, i.e. ``y' = f ⊙ (W + s·BA) x + b``;
* DoRA, AdapterHub's formulation (``dora_form="adapterhub"``, its ``DoRAConfig``): ``f = m / ||W + BA||_row``
  (unscaled, not detached) and ``y' = f ⊙ (y + s · B A dropout(x))`` — the incoming ``y``, bias included, is
  rescaled; ``m`` starts at ``||W||_row``;
* gated (AdapterHub ``use_gating``, UniPELT): ``g = mean_seq sigmoid(x G^T + g_b)`` per
  example and ``y' = y + g · B A dropout(x)`` — the gate *replaces* ``s``, exactly as
  AdapterHub does (its ``LoRA.forward`` multiplies by the gate instead of ``scaling``).

The parameter layout follows PEFT (``lora_A`` = ``lora_A.weight`` [r, in], ``lora_B`` =
``lora_B.weight`` [out, r], ``lora_magnitude`` = ``lora_magnitude_vector`` [out]) and
AdapterHub's gate (``gate.weight`` [1, in], ``gate.bias`` [1]), so checkpoints map 1:1.

Chaining: the insert pass stacks modules on one site as
``y2 = m2(x, m1(x, y0, W, b), W, b)``, always passing the *base* ``W``/``b``. For plain
LoRA that is the sum of the deltas. For DoRA it is what PEFT does for several active
adapters on one layer: the norm uses the base ``W`` only, and in eval (or with dropout
0) ``(f - 1) ⊙ (y - b)`` rescales the incoming ``y`` *including earlier adapters'
deltas*; in training with dropout > 0 PEFT (and this module) recomputes the base
result as ``W · dropout(x)`` without the earlier adapters. Folding a chain one module
at a time reproduces the eval forward exactly if each ``fold`` is given the running
weight and ``base_weight=`` the original ``W`` (as PEFT's merge does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import CheckpointError, MergeError, SpecError
from graphadapt.methods.gates import InputGate
from graphadapt.methods.sliced import SlicedSiteModule
from graphadapt.passes.modules import LowRankDelta, RoutedForm

__all__ = ["LoRAGate", "LoRAModule"]


LoRAGate = InputGate
"""AdapterHub's LoRA gate (:class:`graphadapt.methods.gates.InputGate`, shared with IA3)."""


class LoRAModule(SlicedSiteModule):
    """Low-rank update of one linear site: ``(x, y, W, b) → y'`` (see module docstring).

    Args:
        in_features, out_features: sizes of this module's A/B (``out_features`` is the
            slice width for a fused projection).
        r, alpha: rank and LoRA alpha; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: dropout on the LoRA path input only (``nn.Identity`` when 0, as PEFT —
            DoRA's forward depends on that distinction).
        use_dora, use_gating: DoRA (PEFT) or UniPELT-style gate (AdapterHub); exclusive.
        fan_in_fan_out: base weight is ``[in, out]`` (GPT-2 ``Conv1D``) instead of ``[out, in]``.
        out_slice, total_out: this module owns channels ``[start, end)`` of a ``total_out``
            wide output.
        out_rows: or an index set of those channels (a head-interleaved fused QKV), in the
            order of B's rows (:mod:`graphadapt.methods.sliced`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        use_gating: bool = False,
        lora_bias: bool = False,
        dora_form: str = "peft",
        fan_in_fan_out: bool = False,
        out_slice: tuple[int, int] | None = None,
        total_out: int | None = None,
        out_rows: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.active = True
        if not isinstance(r, int) or r <= 0:
            raise SpecError(f"LoRA rank r must be a positive int, got {r!r}", field="r")
        if not 0.0 <= dropout < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got {dropout!r}", field="dropout")
        if use_dora and use_gating:
            # AdapterHub's gated DoRA rescales the gated branch with an undetached, unscaled
            # norm, PEFT has no gating: there is no reference to match, so refuse it.
            raise SpecError("use_dora and use_gating cannot be combined", field="use_gating")
        if lora_bias and (use_dora or use_gating):
            raise SpecError("lora_bias cannot be combined with DoRA or gating (PEFT has no such variant)",
                            field="lora_bias")
        self._init_site(in_features, out_features, out_slice, total_out, fan_in_fan_out, out_rows)
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.dora_form = dora_form
        self.use_gating = use_gating
        self.scaling: float = alpha / math.sqrt(r) if use_rslora else alpha / r

        factory = {"dtype": dtype, "device": device}
        # Zero-filled, no RNG: graphadapt.init.init_lora_ draws with a per-site generator.
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        if use_dora:
            # Zero until init_dora_magnitude_ (or a checkpoint) sets it from the base weight.
            self.lora_magnitude = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("lora_magnitude", None)
        self.gate = LoRAGate(in_features, **factory) if use_gating else None
        # PEFT's lora_bias: lora_B has a bias, added before scaling (zero at init)
        if lora_bias:
            self.lora_bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("lora_bias", None)

    # ------------------------------------------------------------------ layout helpers
    def _add_into(self, y: Tensor, delta: Tensor) -> Tensor:
        """``y [..., total_out]`` + ``delta [..., out]`` on this module's channels only."""
        return self._replace_slice(y, self._own(y) + delta)

    def _dora_factor(self, rows: Tensor, lora_weight: Tensor, scaling: float) -> Tensor:
        """``m / ||rows + scaling·lora_weight||_row``, the norm detached as in DoRA §4.3 / PEFT."""
        norm = torch.linalg.vector_norm(rows + scaling * lora_weight.detach(), dim=1).to(rows.dtype)
        return self.lora_magnitude / norm.detach()

    # ------------------------------------------------------------------ forward
    def gate_value(self, x: Tensor) -> Tensor:
        """The per-example gate (gated LoRA only): ``[B, S, in] → [B, 1, 1]``, ``[N, in] → [N, 1]``."""
        if self.gate is None:
            raise AttributeError("gate_value needs use_gating=True")
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        return self.gate(x)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``(x [..., in], y [..., total_out], W, b) → y'`` with this module's delta added."""
        if not self.active:  # AdaptedModel.set_active: an inactive adapter is the identity
            return y
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)  # as PEFT: LoRA math in the adapter's dtype, result cast back

        if self.use_dora:
            return self._forward_dora(x, y, weight, bias)

        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B, self.lora_bias)
        if self.gate is not None:
            # AdapterHub: the gate is computed from the undropped input and replaces scaling.
            h = h * self.gate(x)
        else:
            h = h * self.scaling
        return self._add_into(y, h)

    def _forward_dora(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = self._rows(weight).to(x.dtype)
        lora_weight = (self.lora_B @ self.lora_A).to(x.dtype)
        if self.dora_form == "adapterhub":
            factor = self.lora_magnitude / torch.linalg.vector_norm(rows + lora_weight, dim=1)
            h = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
            return self._replace_slice(y, factor * (self._own(y) + h))
        factor = self._dora_factor(rows, lora_weight, self.scaling)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # PEFT reuses the incoming result without its bias: W x (+ earlier adapters).
            base = self._own(y)
            if bias is not None:
                base = base - self._bias_slice(bias)
        else:
            # With active dropout the base term must see the same dropped x as the LoRA
            # term, so PEFT recomputes it from the base weight alone.
            x = self.dropout(x)
            base = F.linear(x, rows)
        lora_out = F.linear(F.linear(x, self.lora_A), self.lora_B)
        delta = (factor - 1) * base + factor * lora_out * self.scaling
        return self._add_into(y, delta)

    # ------------------------------------------------------------------ merge support
    @property
    def reads_base_weight(self) -> str | None:
        """DoRA's forward reads ``W`` (its norm): merge must not fold other adapters into ``W`` under it."""
        return "DoRA" if self.use_dora else None

    @property
    def mergeable(self) -> bool:
        """False for gated LoRA, whose update depends on the input."""
        return not self.use_gating

    @property
    def merge_refusal(self) -> str | None:
        """Why :meth:`fold` is impossible (``None`` when mergeable); shown in merge reports."""
        if self.use_gating:
            return "gated LoRA: its gate depends on the input, so it cannot fold into a weight"
        return None

    def low_rank_delta(self) -> LowRankDelta | None:
        """``s · B A`` when that is this module's whole fold on the full ``[out, in]`` weight (plain/rsLoRA on a
        whole, non-transposed site): the merge pass folds it with one fused ``addmm``. None otherwise (DoRA,
        gated, a fused slice or row set, GPT-2's ``[in, out]`` layout): merge calls :meth:`fold`."""
        if self.use_dora or self.use_gating or self.out_slice is not None or self.out_rows is not None \
                or self.fan_in_fan_out or self.lora_bias is not None:
            return None
        return LowRankDelta(self.lora_A.detach(), self.lora_B.detach(), self.scaling)

    def routed_form(self, weight: Tensor, bias: Tensor | None = None) -> RoutedForm | None:
        """This module's effect as stackable terms for per-row routing (live tensors): plain/rsLoRA ``A, B, s``;
        DoRA adds ``factor = m/‖W + s·BA‖`` (norm detached) and ``gain = factor − 1``. None where that is not
        the forward exactly: gated, a fused slice or row set, ``[in, out]`` layout, dropout while training."""
        if self.use_gating or self.out_slice is not None or self.out_rows is not None or self.fan_in_fan_out \
                or (self.training and not isinstance(self.dropout, nn.Identity)):
            return None
        if not self.use_dora:
            return RoutedForm(A=self.lora_A, B=self.lora_B, scale=self.scaling)
        lora_weight = (self.lora_B @ self.lora_A).to(weight.dtype)
        factor = self._dora_factor(weight, lora_weight, self.scaling)
        return RoutedForm(A=self.lora_A, B=self.lora_B, scale=self.scaling, factor=factor, gain=factor - 1)
    # ------------------------------------------------------------------ swap slots (passes.modules.SwappableModule)
    swap_refusal = None

    def swap_rank(self) -> int:
        return self.r

    def swap_signature(self) -> tuple:
        """Everything but rank and scaling must match between a slot and the adapter swapped into it."""
        return ("lora", self.in_features, self.out_features, self.use_dora, self.gate is not None,
                self.fan_in_fan_out, self.out_slice, self.total_out, self.out_rows)

    @torch.no_grad()
    def swap_tensors(self, rank: int | None = None) -> dict[str, Tensor]:
        """Slot form: ``A`` and ``s·B`` (the gate replaces ``s`` when gated: ``B``), zero-padded to ``rank``
        rows of ``A`` / columns of ``B`` — exact, the padded directions add ``0``; DoRA's norm is unchanged."""
        rank = self.r if rank is None else int(rank)
        if rank < self.r:
            raise ValueError(f"rank {self.r} does not fit a slot of rank {rank}")
        a = self.lora_A.new_zeros(rank, self.in_features)
        a[: self.r] = self.lora_A
        b = self.lora_B.new_zeros(self.out_features, rank)
        b[:, : self.r] = self.lora_B if self.gate is not None else self.lora_B * self.scaling
        out = {"lora_A": a, "lora_B": b}
        if self.lora_magnitude is not None:
            out["lora_magnitude"] = self.lora_magnitude.detach().clone()
        if self.gate is not None:
            out.update({f"gate.{k}": v.detach().clone() for k, v in self.gate.named_parameters()})
        return out

    @torch.no_grad()
    def make_swap_slot_(self, rank: int | None = None) -> None:
        """In place: rank ``rank`` (padded), scaling ``1`` folded into ``B``; the same function."""
        tensors = self.swap_tensors(rank)
        grad = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(tensors["lora_A"], requires_grad=grad)
        self.lora_B = nn.Parameter(tensors["lora_B"], requires_grad=grad)
        self.r = tensors["lora_A"].shape[0]
        if self.gate is None:
            self.alpha, self.use_rslora, self.scaling = float(self.r), False, 1.0

    def adapterhub_tensors(self) -> dict[str, nn.Parameter]:
        """AdapterHub ``loras`` key → parameter (:mod:`graphadapt.methods.adapterhub_loras`)."""
        if self.lora_magnitude is not None and self.dora_form != "adapterhub":
            raise CheckpointError("PEFT-form DoRA has no AdapterHub layout (AdapterHub's DoRA is dora_form='adapterhub')")
        if self.lora_bias is not None:
            raise CheckpointError("AdapterHub LoRA has no lora_bias")
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude is not None:
            out["m.weight"] = self.lora_magnitude     # AdapterHub [out, 1]: the loader reads it as [out]
        if self.gate is not None:
            out["gate.weight"] = self.gate.weight
            out["gate.bias"] = self.gate.bias
        return out

    def _refuse_gated(self, what: str) -> None:
        if self.use_gating:
            raise MergeError(
                f"cannot {what} a gated LoRA: its update is scaled by a gate computed from the "
                "input at run time, so no fixed weight reproduces it; keep it unmerged"
            )

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """``s · B A`` in the base layout and full fused shape, zero outside ``out_slice``.

        ``weight`` (optional) only supplies dtype/device. For DoRA this is the raw LoRA
        update, not the merged change (which depends on ``m`` and ``W``): use :meth:`fold`.
        """
        self._refuse_gated("compute a delta weight for")
        delta = (self.lora_B @ self.lora_A) * self.scaling
        if self.out_rows is not None:
            delta = delta.new_zeros(self.total_out, self.in_features).index_copy_(
                0, self._row_index.to(delta.device), delta)
        elif self.out_slice is not None:
            full = delta.new_zeros(self.total_out, self.in_features)
            full[self.out_slice[0] : self.out_slice[1]] = delta
            delta = full
        if self.fan_in_fan_out:
            delta = delta.t()
        if weight is not None:
            delta = delta.to(dtype=weight.dtype, device=weight.device)
        return delta

    @torch.no_grad()
    def fold(
        self, weight: Tensor, bias: Tensor | None = None, *, base_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(W, b) → (W', b')`` (new tensors, base layout, full shape) with
        ``linear(x, W', b') == forward(x, linear(x, W, b), W, b)`` in eval mode.

        Plain/rsLoRA: ``W' = W + s·BA`` on the module's rows. DoRA (PEFT's merge):
        ``W' = f ⊙ (W + s·BA)`` row-wise, ``f = m / ||W0 + s·BA||`` where ``W0`` is
        ``base_weight`` (the unmerged base; defaults to ``weight``) — pass it when ``weight``
        already holds earlier merged adapters. The bias is returned unchanged (copied).
        Gated LoRA raises :class:`~graphadapt.errors.MergeError`. ``lora_bias``: ``b' = b + s·b_B`` on the module's
        channels.
        """
        self._refuse_gated("fold")
        new_weight = weight.detach().clone()
        new_bias = None if bias is None else bias.detach().clone()
        rows = self._rows(new_weight)
        delta = ((self.lora_B @ self.lora_A) * self.scaling).to(dtype=weight.dtype, device=weight.device)
        if self.use_dora and self.dora_form == "adapterhub":
            w0 = self._rows(weight if base_weight is None else base_weight).to(weight.dtype)
            factor = (self.lora_magnitude / torch.linalg.vector_norm(
                w0 + (self.lora_B @ self.lora_A).to(weight.dtype), dim=1)).to(weight.dtype)
            rows.copy_(factor.unsqueeze(1) * (rows + delta))
            if new_bias is not None:
                self._commit_bias(new_bias, factor * self._bias_slice(new_bias))
        elif self.use_dora:
            w0 = self._rows(weight if base_weight is None else base_weight).to(weight.dtype)
            # PEFT's merge takes the norm of W0 + (s·BA)·1, forward of W0 + s·(BA): same value.
            factor = self._dora_factor(w0, delta, 1.0).to(weight.dtype)
            rows.copy_(factor.unsqueeze(1) * (rows + delta))
        else:
            rows.add_(delta)
        self._commit_rows(new_weight, rows)
        if self.lora_bias is not None:
            if new_bias is None:
                raise MergeError("cannot fold a LoRA with lora_bias into a layer without a bias")
            part = self._bias_slice(new_bias)
            part.add_((self.lora_bias * self.scaling).to(dtype=new_bias.dtype, device=new_bias.device))
            self._commit_bias(new_bias, part)
        return new_weight, new_bias

    @torch.no_grad()
    def init_dora_magnitude_(self, weight: Tensor) -> None:
        """Set ``m = ||W + s·BA||_row`` from the (possibly PiSSA-residual) base weight,
        as PEFT does when the adapter is created, so a fresh DoRA leaves ``y`` unchanged."""
        if not self.use_dora:
            raise AttributeError("init_dora_magnitude_ needs use_dora=True")
        rows = self._rows(weight).to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        if self.dora_form == "adapterhub":   # AdapterHub: m = ||W||_row
            self.lora_magnitude.copy_(torch.linalg.vector_norm(rows, dim=1))
            return
        lora_weight = self.lora_B @ self.lora_A
        self.lora_magnitude.copy_(torch.linalg.vector_norm(rows + self.scaling * lora_weight, dim=1))

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"r={self.r}",
            f"alpha={self.alpha}",
            f"scaling={self.scaling:g}",
        ]
        if isinstance(self.dropout, nn.Dropout):
            parts.append(f"dropout={self.dropout.p}")
        if self.lora_bias is not None:
            parts.append("lora_bias=True")
        for flag in ("use_rslora", "use_dora", "use_gating", "fan_in_fan_out"):
            if getattr(self, flag):
                parts.append(f"{flag}=True")
        if self.out_slice is not None:
            parts.append(f"out_slice={self.out_slice}, total_out={self.total_out}")
        if self.out_rows is not None:
            parts.append(f"out_rows=<{len(self.out_rows)} interleaved>, total_out={self.total_out}")
        return ", ".join(parts)
