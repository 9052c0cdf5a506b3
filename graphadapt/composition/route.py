"""Per-row routing (``Route("a", "b", …)``): one graph serves a batch whose rows use different adapters.

before: ``Spec(active=Route("a", "b"))`` — adapters ``a``, ``b`` built at their sites, not wired
after:  one more graph input ``adapter_ids`` (int64 ``[batch]``; ``i`` = the Route's ``i``-th adapter, ``-1`` = none)
        linear site   ``y' = call_module(adapters._compose.<site>)(x, y, W, b, adapter_ids)`` (:class:`LinearRoute`)
        residual site ``out = call_module(adapters._compose.<site>)(h, r, LN.w, LN.b, adapter_ids)``
        (:class:`ResidualRoute`)

**Linear sites, stacked (BGMV semantics).** When every adapter at the site offers a
:class:`~graphadapt.passes.modules.RoutedForm` (LoRA, rsLoRA, DoRA, IA3 on a whole site), the adapters' terms
are stacked with one extra all-zero slot for ``-1`` — low-rank factors zero-padded to the largest rank (the
padded rows/columns contribute exact zeros), per-channel vectors as ``[N + 1, out]`` — gathered by the row's
id and applied with two batched matmuls::

    y' = y + G[i] ⊙ (y − b) + S[i] + bmm(bmm(x, A[i]ᵀ), (F[i] ⊙ s[i] · B[i])ᵀ) + (x ⊙ C[i]) Wᵀ

No per-adapter branch; the cost is that of one adapter of the largest rank. Gradients reach each adapter
only through the rows that selected it (the gather's backward scatters into its slot).

**Residual points, gathered.** Bottleneck adapters whose :class:`~graphadapt.composition.site.RoutedBranch`
keys are equal (same placement, activation and norm; widths and scalings may differ) share ``pre``/``post``; their
branches ``scale ⊙ (act(x Dᵀ + d) Uᵀ + u)`` are stacked (widths zero-padded: zero ``down`` rows and biases,
zero ``up`` columns add exactly 0) and gathered per row the same way.

**Otherwise (selection).** Modules without a stacked form (gated LoRA/IA3, fused slices, dropout while training,
bottlenecks with their own layer norms, gates or PHM, or of different placements at one point) run on the whole
batch, one after another, and each row keeps its own adapter's output (``torch.where`` on ``adapter_ids``):
exact, N× the adapter cost; rows with ``-1`` keep the base result (at a residual point: the model's own
``LN(h + r)`` / ``h + r``).

:func:`route_input` adds the ``adapter_ids`` placeholder (and the call signature's key);
:func:`check_adapter_ids` is the eager check of a call's ids at the model boundary.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from ..contract import InputError
from ..passes.modules import RoutedForm, routed_form
from .site import RouteNode, _Composition

ROUTE_INPUT = "adapter_ids"
TASK_INPUT = "task_ids"                      # MultiTask's (graphadapt.composition.multitask)
ROUTING_INPUTS = (ROUTE_INPUT, TASK_INPUT)   # at most one is an input of a model


def routing_input(input_names) -> str | None:
    """Which per-row routing input (``adapter_ids`` for Route, ``task_ids`` for MultiTask) ``input_names`` holds."""
    return next((n for n in ROUTING_INPUTS if n in (input_names or ())), None)


# --------------------------------------------------------------------------- graph input
def route_input(gm: fx.GraphModule, name: str = ROUTE_INPUT) -> fx.Node:
    """The ``adapter_ids`` (or ``name``: MultiTask's ``task_ids``) placeholder of ``gm`` (added after the last input
    if absent, with the pytree call signature — ``forward(**kwargs)`` — extended by that key)."""
    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    for n in phs:
        if n.target == name:
            return n
    # after the last tensor input, before captured constants (use_cache=False): exporters order a call's
    # inputs as input_names, then constants, and torch.export binds them in placeholder order
    tensors = [n for n in phs if isinstance(n.meta.get("val"), torch.Tensor)]
    after = tensors[-1] if tensors else phs[-1]
    info = getattr(g._codegen, "pytree_info", None)
    spec = None
    if info is not None and info.in_spec is not None:
        orig = list(info.orig_args)
        tree = pytree.tree_unflatten(list(range(len(orig))), info.in_spec)
        args, kwargs = tree if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[1], dict) else (tree, {})
        at = orig.index(after.target) + 1 if after.target in orig else len(orig)
        if at != len(orig) and at not in kwargs.values():  # the next input is positional: append at the end
            after, at = phs[-1], len(orig)
        new_kwargs = {}
        for k, v in kwargs.items():
            if v == at:
                new_kwargs[name] = at
            new_kwargs[k] = v + 1 if v >= at else v
        new_kwargs.setdefault(name, at)
        _, spec = pytree.tree_flatten((args, new_kwargs))
    with g.inserting_after(after):
        node = g.placeholder(name)
    if spec is not None:
        g._codegen.pytree_info = type(info)(orig[:at] + [name] + orig[at:], spec, info.out_spec)
    ref = next((p.meta["val"] for p in tensors if p.meta["val"].dim() > 0), None)
    mode = getattr(ref, "fake_mode", None)
    if mode is not None:
        with mode:
            node.meta["val"] = torch.empty((ref.shape[0],), dtype=torch.int64, device=ref.device)
    return node


def sync_route_state(gm, routed: bool, slots: int, name: str = ROUTE_INPUT) -> None:
    """Make ``gm``'s input bookkeeping (``input_names``, dynamic axes, ``_in_spec``) match its graph: ``adapter_ids``
    (``name``: MultiTask's ``task_ids``) listed iff the plan routes (``slots`` adapters), the other routing input never. The capture's example inputs stay the source's (re-captures
    and pickles use them); ``AdaptedModel.example_inputs()`` adds example ids."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None and "_in_spec" in gm.__dict__:
        gm._in_spec = info.in_spec
    names = getattr(gm, "input_names", None)
    if names is None:
        return
    names = [n for n in names if n not in ROUTING_INPUTS]
    dims = {k: v for k, v in (gm.__dict__.get("dynamic_dims") or {}).items() if k not in ROUTING_INPUTS}
    if routed:
        names.append(name)
        axis = next((ax[0] for ax in dims.values() if ax.get(0) == "batch"), None) or \
            next((ax[0] for ax in dims.values() if 0 in ax), None)
        if axis is not None:
            dims[name] = {0: axis}
    changed = list(getattr(gm, "input_names", [])) != names
    gm.input_names = names
    if changed and gm.__dict__.get("_call_signature") is not None:
        gm.recompile()  # the call signature shown (and bound by torch.export) gains / loses adapter_ids
    if "dynamic_dims" in gm.__dict__:
        gm.dynamic_dims = dims


def example_ids(batch: int, slots: int, device=None, base: bool = True) -> Tensor:
    """Example ``adapter_ids``: ``-1, 0, 1, …`` cycling, so the base model and the adapters appear among the rows
    (``base=False``, MultiTask's ``task_ids``: ``0, 1, …``)."""
    if not base:
        return torch.arange(batch, dtype=torch.int64, device=device) % max(slots, 1)
    return torch.arange(batch, dtype=torch.int64, device=device) % (slots + 1) - 1


def with_route_parameter(sig: inspect.Signature, name: str = ROUTE_INPUT) -> inspect.Signature:
    """``sig`` with a keyword-only ``adapter_ids`` (or ``name``) (before ``**kwargs``)."""
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    new = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    return sig.replace(parameters=params[:at] + [new] + params[at:])


def coerce_adapter_ids(ids):
    """A list, tuple or numpy array of integer ids as an int64 tensor (as the input contract converts the other
    inputs); anything else unchanged, for :func:`check_adapter_ids` to judge."""
    if isinstance(ids, (list, tuple)) or type(ids).__module__ == "numpy":
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            return ids
        return t.to(torch.int64) if not (t.is_floating_point() or t.dtype == torch.bool) else t
    return ids


def check_adapter_ids(ids, slots: int, batch: int | None, names, *, input: str = ROUTE_INPUT,
                      base: bool = True) -> None:
    """Eager check of a routed call's ``adapter_ids`` (``input``/``base=False``: MultiTask's ``task_ids``, no -1)
    (InputError saying what is wrong and how to fix it)."""
    if base:
        hint = f"one id per batch row: i selects the Route's i-th adapter {list(names)}, -1 the base model"
        what = "this model routes rows by adapter (Route)"
    else:
        hint = (f"one task id per batch row: i selects the MultiTask's i-th adapter {list(names)} (or pass the "
                "task names as a list)")
        what = "this model routes rows by task (MultiTask)"
    if ids is None:
        raise InputError(f"{what}: pass {input}=torch.tensor([...]) ({hint})")
    if not isinstance(ids, Tensor):
        raise InputError(f"{input} must be an int64 tensor ({hint}), got {type(ids).__name__}")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise InputError(f"{input} must hold integers (int64), got {ids.dtype}; {hint}")
    if ids.dim() != 1:
        raise InputError(f"{input} must be 1-D [batch], got shape {tuple(ids.shape)}; {hint}")
    if batch is not None and ids.shape[0] != batch:
        raise InputError(f"{input} has {ids.shape[0]} entries but the batch has {batch} rows; {hint}")
    if _is_fake(ids) or ids.numel() == 0:
        return
    lo, hi, low = int(ids.min()), int(ids.max()), (-1 if base else 0)
    if lo < low or hi >= slots:
        bad = lo if lo < low else hi
        raise InputError(f"{input} holds {bad}, outside [{low}, {slots - 1}]; {hint}")


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch.compiler.is_compiling() or \
        type(t).__name__ in ("FunctionalTensor", "Proxy")


# --------------------------------------------------------------------------- evaluation
def _slots(ids: Tensor, n: int) -> Tensor:
    """Row → slot index in a stack of ``n`` adapters plus the base slot ``n`` (for ``-1``)."""
    return torch.where(ids < 0, torch.full_like(ids, n), ids)


def _pad_rank(t: Tensor, r: int, dim: int) -> Tensor:
    extra = r - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def _rows_view(t: Tensor, batch) -> Tensor:
    """``[B, …, d]`` (or a batch-major flattened ``[B·T, d]``) as ``[B, T, d]``."""
    return t.reshape(batch, -1, t.shape[-1])


class LinearRoute(_Composition):
    """``(x, y, W, b, adapter_ids) → y'`` at a linear site (see the module docstring)."""

    def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias=None, ids=None) -> Tensor:
        tree: RouteNode = self.tree
        slots = list(tree.children)
        forms = [None if k is None else routed_form(self._mods[k.name], weight, bias) for k in slots]
        if any(k is not None and f is None for k, f in zip(slots, forms)):
            return self._select(x, y, weight, bias, ids)
        return self._stacked(x, y, weight, bias, ids, forms)

    def _select(self, x, y, weight, bias, ids):
        batch = ids.shape[0]
        yv = _rows_view(y, batch)
        out = yv
        for i, k in enumerate(self.tree.children):
            if k is None:
                continue
            yi = _rows_view(self._mods[k.name](x, y, weight, bias), batch)
            out = torch.where((ids == i).view(batch, 1, 1), yi, out)
        return out.reshape(y.shape)

    def _stacked(self, x, y, weight, bias, ids, forms: list[RoutedForm | None]):
        n = len(forms)
        batch = ids.shape[0]
        idx = _slots(ids, n)
        out_f, in_f = weight.shape
        live = [f for f in forms if f is not None]
        ref = next((t for f in live for t in (f.A, f.gain, f.in_gain) if t is not None), weight)
        dt, dev = ref.dtype, ref.device
        xv = _rows_view(x, batch)
        if xv.dtype != dt:
            xv = xv.to(dt)
        yv = _rows_view(y, batch)
        delta = None
        low = [f for f in live if f.A is not None]
        if low:
            r = max(f.A.shape[0] for f in low)
            # stacked already transposed (Aᵀ: [in, r], (s·B)ᵀ: [r, out]), so the gathered operands feed bmm as
            # they are (an exported graph folds the stacking of its initializers once)
            zero_a, zero_b = xv.new_zeros(in_f, r), xv.new_zeros(r, out_f)
            a = torch.stack([zero_a if f is None or f.A is None else _pad_rank(f.A, r, 0).t() for f in forms]
                            + [zero_a])
            bs = []
            for f in forms:
                if f is None or f.A is None:
                    bs.append(zero_b)
                    continue
                coef = f.scale if f.factor is None else (f.factor * f.scale)[:, None]
                bs.append(_pad_rank(f.B * coef, r, 1).t())
            b = torch.stack(bs + [zero_b])
            t = torch.bmm(xv, a.index_select(0, idx))          # [B, T, r]
            delta = torch.bmm(t, b.index_select(0, idx))       # [B, T, out]
        if any(f.gain is not None for f in live):
            zero = xv.new_zeros(out_f)
            g = torch.stack([zero if f is None or f.gain is None else f.gain for f in forms] + [zero])
            base = yv if bias is None else yv - bias
            term = g.index_select(0, idx)[:, None, :] * base
            delta = term if delta is None else delta + term
        if any(f.shift is not None for f in live):
            zero = xv.new_zeros(out_f)
            s = torch.stack([zero if f is None or f.shift is None else f.shift for f in forms] + [zero])
            term = s.index_select(0, idx)[:, None, :].expand_as(yv)
            delta = term if delta is None else delta + term
        if any(f.in_gain is not None for f in live):
            zero = xv.new_zeros(in_f)
            c = torch.stack([zero if f is None or f.in_gain is None else f.in_gain for f in forms] + [zero])
            term = F.linear(xv * c.index_select(0, idx)[:, None, :], weight.to(dt))
            delta = term if delta is None else delta + term
        if delta is None:
            return y
        return (yv + delta.to(yv.dtype)).reshape(y.shape)


class ResidualRoute(_Composition):
    """``(h, r, LN.w, LN.b, adapter_ids) → out`` at a residual point: every adapter on the whole batch, each row
    keeps its own adapter's output; ``-1`` rows the base sub-block's (``norm(h + r)`` / ``h + r``)."""

    def __init__(self, tree, modules, norm_kind: str | None, eps: float):
        super().__init__(tree, modules, {})
        self.norm_kind, self.eps = norm_kind, eps

    def _base(self, h, r, w, b):
        x = h + r
        if self.norm_kind == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        if self.norm_kind == "rms_norm":  # fp32 statistics, cast back (HF LlamaRMSNorm / T5LayerNorm)
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            y = y if w is None else w * y
            return y if b is None else y + b
        return x

    def forward(self, h: Tensor, residual: Tensor, ln_weight=None, ln_bias=None, ids=None) -> Tensor:
        batch = ids.shape[0]
        base = self._base(h, residual, ln_weight, ln_bias)
        out = _rows_view(base, batch)
        mods = [None if k is None else self._mods[k.name] for k in self.tree.children]
        forms = [None if m is None else getattr(m, "routed_branch", lambda: None)() for m in mods]
        live = [(m, f) for m, f in zip(mods, forms) if m is not None]
        if live and all(f is not None for _, f in live) and len({f.key for _, f in live}) == 1:
            return self._stacked(h, residual, ln_weight, ln_bias, ids, out, base.shape, live[0][0], forms)
        for i, k in enumerate(self.tree.children):
            if k is None:
                continue
            yi = _rows_view(self._mods[k.name](h, residual, ln_weight, ln_bias), batch)
            out = torch.where((ids == i).view(batch, 1, 1), yi, out)
        return out.reshape(base.shape)

    def _stacked(self, h, residual, ln_weight, ln_bias, ids, base_rows, shape, first, forms):
        """Adapters sharing ``pre``/``post`` (equal keys): one gathered down/up product, zero-padded widths
        (a padded unit has zero ``down`` row and bias and a zero ``up`` column: it adds exactly 0)."""
        n, batch = len(forms), ids.shape[0]
        idx = _slots(ids, n)
        x, _, res = first.pre(h, residual, ln_weight, ln_bias)
        xv = _rows_view(x, batch)
        live = [f for f in forms if f is not None]
        d, r = live[0].up_w.shape[0], max(f.down_w.shape[0] for f in live)
        zd, zdb, zu, zv = xv.new_zeros(d, r), xv.new_zeros(r), xv.new_zeros(r, d), xv.new_zeros(d)
        down = torch.stack([zd if f is None else _pad_rank(f.down_w, r, 0).t() for f in forms] + [zd])
        down_b = torch.stack([zdb if f is None else _pad_rank(f.down_b, r, 0) for f in forms] + [zdb])
        up = torch.stack([zu if f is None else _pad_rank(f.up_w, r, 1).t() for f in forms] + [zu])
        up_b = torch.stack([zv if f is None else f.up_b for f in forms] + [zv])
        scale = torch.stack([zv if f is None else (torch.as_tensor(f.scale, dtype=xv.dtype, device=xv.device)
                                                   * torch.ones_like(zv)) for f in forms] + [zv])
        z = torch.bmm(xv, down.index_select(0, idx)) + down_b.index_select(0, idx)[:, None, :]
        y = torch.bmm(live[0].act(z), up.index_select(0, idx)) + up_b.index_select(0, idx)[:, None, :]
        y = (y * scale.index_select(0, idx)[:, None, :]).reshape(x.shape)
        if not live[0].parallel:
            y = y + res
        y = first.post(y, h, residual, ln_weight, ln_bias)
        return torch.where((ids < 0).view(batch, 1, 1), base_rows, _rows_view(y, batch)).reshape(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gathered where the adapters share a RoutedBranch key, else selection"


__all__ = ["LinearRoute", "ROUTE_INPUT", "ROUTING_INPUTS", "ResidualRoute", "TASK_INPUT", "routing_input", "check_adapter_ids", "coerce_adapter_ids", "example_ids", "route_input",
           "sync_route_state",
           "with_route_parameter"]
