"""Bottleneck adapters (Houlsby, Pfeiffer, parallel/He, AdapterPlus, Compacter) as one ``nn.Module``.

Transform at one residual point of a Transformer sub-block, with ``h`` the sub-block output (after its output
projection and dropout), ``r`` the sub-block input (residual stream) and ``LN`` the model's own norm after the
add (``norm_kind=None`` when there is none, i.e. pre-LN models):

    before:  out = LN(h + r)                       (pre-LN: out = h + r)
    after:   out = BottleneckAdapter(h, r, LN.weight, LN.bias)

Numerically identical to AdapterHub ``adapters`` 1.3.0 ``BottleneckLayer`` with one active adapter
(``Stack(name)``: ``pre_forward`` → ``Adapter.forward`` → ``post_forward``), with AdapterHub's ``layer_norm``
argument being the model norm, or ``None`` when ``norm_kind is None``. With ``A(x) = gate(x) · dropout(
scaling · DropPath(up(act(down(LN_before(x))))))`` (DropPath: ``stochastic_depth``, sequential only):

sequential (``is_parallel=False``)::

    x   = LN(h + r)  if original_ln_before else h           (no norm: h + r)
    res = h if residual_before_ln is True; h + r if "post_add"; x if False
    y   = LN_after(A(x) + res) if adapter_residual_before_ln else LN_after(A(x)) + res
    out = LN(y + r) if original_ln_after else y             (no norm: y + r)

parallel (``is_parallel=True``; ``original_ln_before``/``residual_before_ln``/``adapter_residual_before_ln``
are ignored, as in AdapterHub)::

    y   = LN_after(A(r)) + h
    out = LN(y + r) if original_ln_after else y             (no norm: y + r)

``LN_before``/``LN_after`` are the adapter's own LayerNorms (``ln_before``/``ln_after``, eps 1e-5) and are
identities when off. ``gate(x) = mean_seq(sigmoid(x @ g.T + g_b))`` of shape ``(batch, 1, 1)`` (inputs are
``(batch, seq, hidden)``), 1 when ``use_gating=False``.

Deviations from AdapterHub (none changes the output of a configuration AdapterHub runs, given equal weights):

- ``residual_before_ln="post_add"`` with no norm takes ``res = h + r`` (AdapterHub: UnboundLocalError);
  with ``original_ln_before=False`` it is rejected at construction (AdapterHub: UnboundLocalError).
- ``scaling`` may be an int (AdapterHub rejects ``4``, accepts ``4.0``).
- Initialisation draws from an explicit ``torch.Generator``; AdapterHub uses (and with ``init_weights_seed``
  reseeds) the global RNG. PHM layers accept ``mam_adapter``/``houlsby`` (AdapterHub: AttributeError) and honour
  ``hypercomplex_nonlinearity`` (see :mod:`graphadapt.methods.bottleneck.phm`).
- With ``ln_before=True``, ``mam_adapter``/``houlsby`` initialise the down projection and leave the new
  LayerNorm at weight 1 / bias 0 — the same as AdapterHub 1.3.0, which also picks the Linear inside its
  ``adapter_down`` Sequential.

State-dict keys (AdapterHub per-site ``Adapter`` key → graphadapt key, see :func:`adapterhub_key_map`)::

    adapter_norm_before.{weight,bias}   → adapter_norm_before.{weight,bias}   (also stored by AdapterHub as
                                                                               adapter_down.0.*: dropped)
    adapter_down.{0|1}.{weight,bias}    → adapter_down.{weight,bias}          (index 1 when ln_before)
    adapter_down.{0|1}.{W,W_left,W_right,phm_rule,phm_rule_left,phm_rule_right}
                                        → adapter_down.<same>                 (PHM)
    adapter_down.{0|1}.b                → adapter_down.bias                   (PHM bias)
    adapter_up.{weight,bias,W,…}        → adapter_up.<same>;  adapter_up.b → adapter_up.bias
    adapter_norm_after.{weight,bias}    → adapter_norm_after.{weight,bias}
    gate.{weight,bias}                  → gate.{weight,bias}
    scaling                             → scaling                             ("learned"/"channel" only)

AdapterHub's model-level ``shared_parameters.<adapter>.<key>`` map 1:1 onto the keys of the caller-owned
``shared`` dict (:func:`graphadapt.methods.bottleneck.phm.init_shared_phm_parameters`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphadapt.errors import CheckpointError, SpecError

from graphadapt.methods.activations import ACTIVATIONS, get_activation

from .phm import PHMConfig, PHMLinear

__all__ = [
    "BottleneckAdapter",
    "AdapterLinear",
    "ACTIVATIONS",
    "get_activation",
    "adapterhub_key_map",
    "load_adapterhub_state_dict",
    "kwargs_from_adapterhub_config",
    "module_kwargs",
]

class AdapterLinear(nn.Linear):
    """``nn.Linear`` whose constructor does not draw from the global RNG; :class:`BottleneckAdapter` fills it."""

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        pass


def _rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    # fp32 statistics then cast back, as HF LlamaRMSNorm/T5LayerNorm do, so half-precision models match.
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = weight * y
    if bias is not None:
        y = y + bias
    return y


def _stochastic_depth(x: Tensor, p: float, training: bool) -> Tensor:
    # torchvision.ops.stochastic_depth(mode="row"), which AdapterHub uses (DropPath) and we do not depend on.
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


_INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter at one residual point: ``LN(h + r)`` → ``module(h, r, LN.weight, LN.bias)``.

    See the module docstring for the exact formula, state-dict keys and AdapterHub differences. Options are
    AdapterHub ``BnConfig``'s, with ``SeqBnConfig`` (Pfeiffer) defaults — note plain ``BnConfig`` defaults to
    ``original_ln_before=False``; use :func:`kwargs_from_adapterhub_config` to translate a config. Plus:

    - ``norm_kind``: the model norm after the add — ``"layer_norm"`` (``F.layer_norm(x, (hidden,), w, b,
      norm_eps)``), ``"rms_norm"`` (``w · x · rsqrt(mean(x²) + eps)`` [+ b]), or ``None`` when the site has no
      norm after the add (pre-LN models: GPT-2, Llama, ViT, T5); then ``ln_weight``/``ln_bias`` are ignored and
      every place AdapterHub would call the norm degrades exactly as AdapterHub's ``layer_norm=None`` does.
    - ``stochastic_depth``: AdapterHub's DropPath (row mode, training only, sequential adapters only).
    - ``shared``: caller-owned ``nn.ParameterDict`` of shared PHM tensors (required when ``phm_layer`` and
      ``shared_phm_rule`` or ``shared_W_phm``; see :mod:`graphadapt.methods.bottleneck.phm`). Not registered here.
    - ``generator``: CPU ``torch.Generator`` for initialisation; ``None`` means a fresh one seeded 0. The global
      RNG is never used (see :meth:`reset_parameters`).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        reduction_factor: float,
        non_linearity: str = "relu",
        original_ln_before: bool = True,
        original_ln_after: bool = True,
        residual_before_ln: bool | Literal["post_add"] = True,
        adapter_residual_before_ln: bool = False,
        ln_before: bool = False,
        ln_after: bool = False,
        init_weights: Literal["bert", "mam_adapter", "houlsby"] = "bert",
        is_parallel: bool = False,
        scaling: float | Literal["learned", "channel"] = 1.0,
        use_gating: bool = False,
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        phm_layer: bool = False,
        phm_dim: int = 4,
        phm_rank: int = 1,
        factorized_phm_W: bool = True,
        shared_W_phm: bool = False,
        shared_phm_rule: bool = True,
        factorized_phm_rule: bool = False,
        learn_phm: bool = True,
        phm_c_init: Literal["normal", "uniform"] = "normal",
        phm_init_range: float = 1e-4,
        hypercomplex_nonlinearity: str = "glorot-uniform",
        phm_bias: bool = True,
        shared: nn.ParameterDict | None = None,
        norm_kind: Literal["layer_norm", "rms_norm"] | None = "layer_norm",
        norm_eps: float = 1e-12,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.active = True
        if hidden_size < 1:
            raise SpecError(f"hidden_size must be >= 1, got {hidden_size}", field="hidden_size")
        if not reduction_factor > 0:
            raise SpecError(f"reduction_factor must be > 0, got {reduction_factor}", field="reduction_factor")
        if init_weights not in _INIT_SCHEMES:
            raise SpecError(f"init_weights must be one of {_INIT_SCHEMES}, got {init_weights!r}", "init_weights")
        if not (isinstance(residual_before_ln, bool) or residual_before_ln == "post_add"):
            raise SpecError(
                f"residual_before_ln must be True, False or 'post_add', got {residual_before_ln!r}",
                field="residual_before_ln",
            )
        if residual_before_ln == "post_add" and not original_ln_before and not is_parallel:
            # AdapterHub leaves its adapter residual unassigned here (UnboundLocalError).
            raise SpecError(
                "residual_before_ln='post_add' needs original_ln_before=True (there is no add before the adapter)",
                field="residual_before_ln",
            )
        if norm_kind not in ("layer_norm", "rms_norm", None):
            raise SpecError(f"norm_kind must be 'layer_norm', 'rms_norm' or None, got {norm_kind!r}", "norm_kind")
        if not 0.0 <= dropout <= 1.0:
            raise SpecError(f"dropout must be in [0, 1], got {dropout}", field="dropout")
        if not 0.0 <= stochastic_depth <= 1.0:
            raise SpecError(f"stochastic_depth must be in [0, 1], got {stochastic_depth}", "stochastic_depth")
        self._act = get_activation(non_linearity)

        self.hidden_size = hidden_size
        # AdapterHub: int(hidden // reduction_factor), at least 1.
        self.bottleneck_size = max(1, int(hidden_size // reduction_factor))
        self.reduction_factor = reduction_factor
        self.non_linearity = non_linearity.lower()
        self.original_ln_before = original_ln_before
        self.original_ln_after = original_ln_after
        self.residual_before_ln = residual_before_ln
        self.adapter_residual_before_ln = adapter_residual_before_ln
        self.ln_before, self.ln_after = ln_before, ln_after
        self.init_weights = init_weights
        self.is_parallel = is_parallel
        self.use_gating = use_gating
        self.dropout = dropout
        self.stochastic_depth = stochastic_depth
        self.phm_layer = phm_layer
        self.norm_kind = norm_kind
        self.norm_eps = norm_eps
        factory = {"dtype": dtype, "device": device}

        if ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory)
        if phm_layer:
            self.phm_config = PHMConfig(
                phm_dim=phm_dim,
                phm_rank=phm_rank,
                factorized_phm_W=factorized_phm_W,
                shared_W_phm=shared_W_phm,
                shared_phm_rule=shared_phm_rule,
                factorized_phm_rule=factorized_phm_rule,
                learn_phm=learn_phm,
                phm_c_init=phm_c_init,
                phm_init_range=phm_init_range,
                hypercomplex_nonlinearity=hypercomplex_nonlinearity,
                phm_bias=phm_bias,
            )
            phm = {"config": self.phm_config, "shared": shared, "init_weights": init_weights, **factory}
            self.adapter_down = PHMLinear(hidden_size, self.bottleneck_size, position="down", **phm)
            self.adapter_up = PHMLinear(self.bottleneck_size, hidden_size, position="up", **phm)
        else:
            self.phm_config = None
            self.adapter_down = AdapterLinear(hidden_size, self.bottleneck_size, **factory)
            self.adapter_up = AdapterLinear(self.bottleneck_size, hidden_size, **factory)

        if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            self.scaling_kind = "float"
            self.scaling = float(scaling)
        elif scaling == "learned":
            self.scaling_kind = "learned"
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        elif scaling == "channel":
            self.scaling_kind = "channel"
            self.scaling = nn.Parameter(torch.ones(hidden_size, **factory))
        else:
            raise SpecError(f"scaling must be a number, 'learned' or 'channel', got {scaling!r}", field="scaling")

        if ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden_size, **factory)
        if use_gating:
            self.gate = AdapterLinear(hidden_size, 1, **factory)
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """(Re)initialise every own parameter from ``generator``, never from the global RNG.

        Values are drawn in fp32 on ``generator.device`` in a fixed order (down, up, gate, PHM rules) and copied
        into the parameters, so one seed gives the same weights on any device and dtype.

        - bert: Linear weights N(0, 0.02), biases 0 (AdapterHub: up projection is *not* zero, so the adapter is
          not the identity at init); PHM layers keep their PHM init (AdapterHub applies bert init to
          ``nn.Linear`` only).
        - mam_adapter: down weight kaiming_uniform(a=√5), bias 0; up weight and bias 0 (identity at init);
          gate bert.
        - houlsby: down and up weights trunc_normal(0, 1e-2, ±2e-2), biases 0; gate keeps ``nn.Linear``'s
          default init (as in AdapterHub), here from ``generator``.
        - ``adapter_norm_before``/``adapter_norm_after``: weight 1, bias 0; learned/channel scaling: 1.
        """

        def fill(t: Tensor, fn) -> None:
            s = torch.empty(t.shape, dtype=torch.float32, device=generator.device)
            fn(s)
            t.copy_(s.to(device=t.device, dtype=t.dtype))

        def bert_(lin: nn.Linear) -> None:
            fill(lin.weight, lambda s: nn.init.normal_(s, 0.0, 0.02, generator=generator))
            lin.bias.zero_()

        def torch_default_(lin: nn.Linear) -> None:
            bound = 1.0 / math.sqrt(lin.in_features)
            fill(lin.weight, lambda s: nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=generator))
            fill(lin.bias, lambda s: nn.init.uniform_(s, -bound, bound, generator=generator))

        def trunc_(t: Tensor) -> None:
            fill(t, lambda s: nn.init.trunc_normal_(s, 0.0, 1e-2, -2e-2, 2e-2, generator=generator))

        for norm in (getattr(self, "adapter_norm_before", None), getattr(self, "adapter_norm_after", None)):
            if norm is not None:
                norm.reset_parameters()  # ones/zeros, no RNG
        if isinstance(self.scaling, nn.Parameter):
            self.scaling.fill_(1.0)

        down, up = self.adapter_down, self.adapter_up
        if self.phm_layer:
            # PHM layers implement the three schemes themselves (see PHMLinear.reset_parameters).
            down.reset_parameters(generator)
            up.reset_parameters(generator)
        elif self.init_weights == "bert":
            bert_(down)
            bert_(up)
        elif self.init_weights == "mam_adapter":
            fill(down.weight, lambda s: nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=generator))
            down.bias.zero_()
            up.weight.zero_()
            up.bias.zero_()
        else:  # houlsby
            trunc_(down.weight)
            down.bias.zero_()
            trunc_(up.weight)
            up.bias.zero_()

        if self.use_gating:
            if self.init_weights == "houlsby":
                torch_default_(self.gate)
            else:
                bert_(self.gate)

    # --------------------------------------------------------------- forward
    def _norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """The model's own norm; identity when the site has none (AdapterHub ``layer_norm=None``)."""
        if self.norm_kind == "layer_norm":
            return F.layer_norm(x, (self.hidden_size,), weight, bias, self.norm_eps)
        if self.norm_kind == "rms_norm":
            return _rms_norm(x, weight, bias, self.norm_eps)
        return x

    def adapter_branch(self, x: Tensor) -> Tensor:
        """``x → gate(x) · dropout(scaling · DropPath(up(act(down(LN_before(x))))))`` (``A(x)``)."""
        return self._branch(x)[0]

    def _branch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A(x), up)`` with ``up = scaling · DropPath(up(act(down(·))))`` before dropout and gate —
        AdapterHub's ``bottleneck_up``, the quantity AdapterFusion attends over."""
        z = self.adapter_norm_before(x) if self.ln_before else x
        up = self.adapter_up(self._act(self.adapter_down(z)))
        if not self.is_parallel:  # AdapterHub's ParallelAdapter has no DropPath
            up = _stochastic_depth(up, self.stochastic_depth, self.training)
        up = up * self.scaling
        out = F.dropout(up, self.dropout, self.training)
        if self.use_gating:
            # AdapterHub: one gate per sequence, averaged over the sequence dim of (batch, seq, hidden) inputs.
            g = torch.sigmoid(self.gate(x))
            out = out * torch.mean(g, dim=1).unsqueeze(-1)
        return out, up

    # The three steps below are AdapterHub's pre_forward / forward / post_forward; composition
    # (graphadapt.composition) calls them to evaluate Stack/Fuse/BatchSplit/Parallel/Average trees.
    def pre(self, h: Tensor, residual: Tensor, ln_weight=None, ln_bias=None,
            query_before_ln: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(h, r) → (x, query, res)``: the adapter input, the fusion query, the adapter's residual."""
        if self.is_parallel:
            return residual, residual, residual
        x, res, query = h, h, h if query_before_ln else None
        if self.original_ln_before:
            x = h + residual
            if self.residual_before_ln == "post_add":
                res = x
            x = self._norm(x, ln_weight, ln_bias)
        if self.residual_before_ln is False:
            res = x
        if not query_before_ln:
            query = x
        return x, query, res

    def core(self, x: Tensor, res: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, res) → (hidden, up)``: the adapter itself (with its residual unless parallel)."""
        y, up = self._branch(x)
        if self.is_parallel:
            return (self.adapter_norm_after(y) if self.ln_after else y), up
        if self.adapter_residual_before_ln:
            y = y + res
        if self.ln_after:
            y = self.adapter_norm_after(y)
        if not self.adapter_residual_before_ln:
            y = y + res
        return y, up

    def post(self, hidden: Tensor, h: Tensor, residual: Tensor, ln_weight=None, ln_bias=None) -> Tensor:
        """``hidden → out``: the parallel adapter adds the block output; then the model's residual (+ LN)."""
        if self.is_parallel:
            hidden = hidden + h
        if self.original_ln_after:
            hidden = self._norm(hidden + residual, ln_weight, ln_bias)
        return hidden

    mergeable = False
    merge_refusal = "bottleneck adapter: non-linear in its input, so it stays in the graph"

    def forward(
        self, h: Tensor, residual: Tensor, ln_weight: Tensor | None = None, ln_bias: Tensor | None = None
    ) -> Tensor:
        """``(h, r[, LN.weight, LN.bias])`` → adapted sub-block output; replaces ``LN(h + r)`` (or ``h + r``)."""
        if not self.active:  # AdaptedModel.set_active: behave exactly like the un-adapted sub-block
            return self._norm(h + residual, ln_weight, ln_bias)
        x, _, res = self.pre(h, residual, ln_weight, ln_bias)
        y, _ = self.core(x, res)
        return self.post(y, h, residual, ln_weight, ln_bias)

    # --------------------------------------------------------------- per-row routing (composition.site.RoutedBranch)
    def routed_branch(self):
        """The branch as stackable terms (``Route`` gathers them per row), or None where the branch is more
        than ``scale · up(act(down(x)))``: PHM factors, the adapter's own layer norms, gating, or dropout /
        stochastic depth while training."""
        from graphadapt.composition.site import RoutedBranch

        if self.phm_layer or self.ln_before or self.ln_after or self.use_gating or \
                (self.training and (self.dropout > 0 or self.stochastic_depth > 0)):
            return None
        key = ("bottleneck", self.hidden_size, self.non_linearity, self.original_ln_before, self.original_ln_after,
               self.residual_before_ln, self.adapter_residual_before_ln, self.is_parallel, self.norm_kind,
               self.norm_eps)
        return RoutedBranch(self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight,
                            self.adapter_up.bias, self.scaling, self._act, key, self.is_parallel)

    # --------------------------------------------------------------- swap slots (passes.modules.SwappableModule)
    @property
    def swap_refusal(self) -> str | None:
        if self.phm_layer:
            return "PHM bottleneck adapter: its weights are Kronecker factors (possibly shared), not one slot"
        return None

    def swap_rank(self) -> int:
        return self.bottleneck_size

    def swap_signature(self) -> tuple:
        """Everything but the bottleneck width and a constant scaling must match."""
        return ("bottleneck", self.hidden_size, self.non_linearity, self.original_ln_before, self.original_ln_after,
                self.residual_before_ln, self.adapter_residual_before_ln, self.ln_before, self.ln_after,
                self.is_parallel, self.use_gating, self.scaling_kind,
                self.norm_kind, self.norm_eps, self.phm_layer)

    @torch.no_grad()
    def swap_tensors(self, rank: int | None = None) -> dict[str, Tensor]:
        """Slot form: a constant ``scaling`` folded into ``up`` (weight and bias); the bottleneck zero-padded to
        ``rank`` (padded units: zero ``down`` rows and bias, zero ``up`` columns — they add exactly ``0``)."""
        if self.swap_refusal:
            raise ValueError(self.swap_refusal)
        size = self.bottleneck_size
        rank = size if rank is None else int(rank)
        if rank < size:
            raise ValueError(f"bottleneck size {size} does not fit a slot of rank {rank}")
        s = self.scaling if self.scaling_kind == "float" else 1.0
        out = {k: v.detach().clone() for k, v in self.named_parameters()}
        down_w = self.adapter_down.weight.new_zeros(rank, self.hidden_size)
        down_w[:size] = self.adapter_down.weight
        down_b = self.adapter_down.bias.new_zeros(rank)
        down_b[:size] = self.adapter_down.bias
        up_w = self.adapter_up.weight.new_zeros(self.hidden_size, rank)
        up_w[:, :size] = self.adapter_up.weight * s
        out.update({"adapter_down.weight": down_w, "adapter_down.bias": down_b, "adapter_up.weight": up_w,
                    "adapter_up.bias": self.adapter_up.bias * s})
        return out

    @torch.no_grad()
    def make_swap_slot_(self, rank: int | None = None) -> None:
        """In place: bottleneck ``rank`` (padded), constant scaling ``1`` folded into ``up``; the same function."""
        tensors = self.swap_tensors(rank)
        grad = self.adapter_down.weight.requires_grad
        w = tensors["adapter_down.weight"]
        down = AdapterLinear(self.hidden_size, w.shape[0], dtype=w.dtype, device=w.device)
        up = AdapterLinear(w.shape[0], self.hidden_size, dtype=w.dtype, device=w.device)
        for lin, key in ((down, "adapter_down"), (up, "adapter_up")):
            lin.weight.copy_(tensors[f"{key}.weight"])
            lin.bias.copy_(tensors[f"{key}.bias"])
            lin.requires_grad_(grad)
        self.adapter_down, self.adapter_up = down, up
        self.bottleneck_size = w.shape[0]
        if self.scaling_kind == "float":
            self.scaling = 1.0

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
            f"non_linearity={self.non_linearity!r}, parallel={self.is_parallel}, "
            f"original_ln_before={self.original_ln_before}, original_ln_after={self.original_ln_after}, "
            f"residual_before_ln={self.residual_before_ln!r}, scaling={self.scaling_kind}, "
            f"gating={self.use_gating}, phm={self.phm_layer}, norm_kind={self.norm_kind!r}"
        )


# ------------------------------------------------------------- checkpoints


def adapterhub_key_map(module: BottleneckAdapter) -> dict[str, str | None]:
    """AdapterHub per-site ``Adapter`` state-dict key → ``module`` key (``None``: duplicate AdapterHub drops).

    Keys are relative to the AdapterHub ``Adapter`` module, e.g. the part after
    ``bert.encoder.layer.0.output.adapters.<name>.``.
    """
    m: dict[str, str | None] = {}
    down_idx = 1 if module.ln_before else 0
    if module.ln_before:
        for p in ("weight", "bias"):
            m[f"adapter_norm_before.{p}"] = f"adapter_norm_before.{p}"
            m[f"adapter_down.0.{p}"] = None  # the same LayerNorm, registered twice by AdapterHub
    for src, dst in ((f"adapter_down.{down_idx}", "adapter_down"), ("adapter_up", "adapter_up")):
        sub = getattr(module, dst)
        for name, _ in sub.named_parameters(recurse=False):
            m[f"{src}.{'b' if module.phm_layer and name == 'bias' else name}"] = f"{dst}.{name}"
    if module.ln_after:
        for p in ("weight", "bias"):
            m[f"adapter_norm_after.{p}"] = f"adapter_norm_after.{p}"
    if module.use_gating:
        for p in ("weight", "bias"):
            m[f"gate.{p}"] = f"gate.{p}"
    if isinstance(module.scaling, nn.Parameter):
        m["scaling"] = "scaling"
    return m


def load_adapterhub_state_dict(
    module: BottleneckAdapter, state_dict: Mapping[str, Tensor], prefix: str = "", strict: bool = True
) -> None:
    """Copy an AdapterHub per-site adapter state dict (keys after ``prefix``) into ``module``.

    ``strict``: every module tensor must be present and no unrecognised AdapterHub key may remain.
    Shared PHM tensors are not part of a per-site dict; AdapterHub's ``shared_parameters.<name>.<key>`` load
    into the caller's ``shared`` dict under the same ``<key>``.
    """
    key_map = adapterhub_key_map(module)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unknown = sorted(k for k in sd if k not in key_map)
    if strict and unknown:
        raise CheckpointError(f"unrecognised AdapterHub adapter keys {unknown}; expected {sorted(key_map)}")
    converted = {dst: sd[src] for src, dst in key_map.items() if dst is not None and src in sd}
    if module.ln_before:  # accept checkpoints that only kept the Sequential alias of the pre-adapter norm
        for p in ("weight", "bias"):
            if f"adapter_norm_before.{p}" not in converted and f"adapter_down.0.{p}" in sd:
                converted[f"adapter_norm_before.{p}"] = sd[f"adapter_down.0.{p}"]
    missing, unexpected = module.load_state_dict(converted, strict=False)
    if strict and missing:
        raise CheckpointError(f"AdapterHub state dict lacks tensors for {sorted(missing)}")
    assert not unexpected, unexpected


_ADAPTERHUB_KWARGS = (
    "non_linearity", "original_ln_before", "original_ln_after", "residual_before_ln", "adapter_residual_before_ln",
    "ln_before", "ln_after", "init_weights", "is_parallel", "scaling", "use_gating", "dropout", "stochastic_depth",
    "phm_layer", "phm_dim", "phm_rank", "factorized_phm_W", "shared_W_phm", "shared_phm_rule",
    "factorized_phm_rule", "learn_phm", "phm_c_init", "phm_init_range", "hypercomplex_nonlinearity", "phm_bias",
)  # fmt: skip


def kwargs_from_adapterhub_config(config: Mapping, layer_idx: int | None = None) -> dict:
    """AdapterHub ``BnConfig`` (object or ``adapter_config.json`` dict) → :class:`BottleneckAdapter` kwargs.

    Resolves a per-layer ``reduction_factor`` mapping (``{"3": 8, "default": 16}``) for ``layer_idx``. Placement
    keys (``mh_adapter``, ``output_adapter``, ``leave_out``, …) and ``init_weights_seed`` are not module options
    and are dropped; the caller adds ``hidden_size``, ``norm_kind``, ``norm_eps``, ``shared`` and ``generator``.
    """
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    rf = get("reduction_factor")
    if isinstance(rf, Mapping):
        if layer_idx is not None and str(layer_idx) in rf:
            rf = rf[str(layer_idx)]
        elif "default" in rf:
            rf = rf["default"]
        else:
            raise SpecError(f"reduction_factor mapping {dict(rf)} has no entry for layer {layer_idx} and no default",
                            field="reduction_factor")
    kwargs = {"reduction_factor": rf}
    for k in _ADAPTERHUB_KWARGS:
        v = get(k, None)
        if v is not None:
            kwargs[k] = v
    return kwargs


_MODULE_PARAMS = set(inspect.signature(BottleneckAdapter.__init__).parameters) - {"self"}


def module_kwargs(spec, layer_index: int) -> dict:
    """``BottleneckAdapter`` keyword arguments from a Bottleneck spec, for layer ``layer_index``."""
    import dataclasses

    kw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name in _MODULE_PARAMS}
    kw["reduction_factor"] = spec.reduction_for(layer_index)
    return kw
