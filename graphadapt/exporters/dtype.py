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

from graphadapt.dtypes import DTYPE_NAMES, DTYPES, parse_dtype  # noqa: F401  (re-exported)
from graphadapt.passes import run_pass
from graphadapt.passes.experts import has_grouped_experts, lower_grouped_mm
from graphadapt.passes.portability import drop_dtype_pins
from graphadapt.passes.retarget_dtype import retarget_dtype_pass


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Cast floating tensors (``pixel_values``) to ``dtype``; integer ids and masks stay as they are."""
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


def converted_copy(model: torch.nn.Module, dtype: torch.dtype, example_inputs: dict[str, Any],
                   merge: bool = False, lazy_merge: bool = False, weights_from=None) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` (``model`` itself when already there and nothing to merge);
    never converts or merges ``model`` itself.

    Memory: the copy's modules and graph are new, but its tensors are converted one at a
    time from ``model``'s (each fp32 tensor is read, its half copy made, nothing else kept),
    and tensors already in ``dtype`` are shared, not copied. ``merge=True`` (a graphadapt
    ``AdaptedModel`` that is not merged) also folds every foldable adapter into the copy:
    each merged weight is folded in the model's dtype and converted right away, so the
    extra memory is the copy in ``dtype`` plus one weight. Unfoldable adapters stay in the
    copy's graph (like ``merge()``); ``copy.graphadapt_merge_report`` says what was folded.

    ``lazy_merge=True`` (with ``merge``) computes no merged value: each weight (and bias) that
    a fold changes holds a placeholder of the right shape and dtype (a view of the base tensor
    when it is already in ``dtype``, else an untouched allocation), and
    ``copy.graphadapt_lazy_folds`` maps its name to a :class:`LazyFold` that computes the real
    value on demand. The copy's forward is then *wrong* until those values are installed: it is
    for tracing (torch.onnx.export) and writing the values one at a time (see
    :func:`graphadapt.exporters.onnx.export_onnx`), never for computing outputs.

    ``weights_from`` (a :class:`graphadapt.outofcore.WeightSource`: the model's base weights are hollow and
    live in a checkpoint) makes every large hollow tensor a placeholder whose value (read from the
    checkpoint, folded when an adapter merges into it) ``graphadapt_lazy_folds`` computes on demand; small
    ones are read here. Needs ``dtype`` to be the checkpoint tensors' own dtype.
    """
    plan = None
    if merge and callable(getattr(model, "merge", None)) and not getattr(model, "is_merged", False) \
            and isinstance(model, torch.fx.GraphModule):
        from graphadapt.passes.merge import plan_merge

        plan = plan_merge(model, None, safe=True, compute=False)  # checks adapter factors
        if not plan.chains:
            plan = None
    # grouped expert products (mixture of experts) have no ONNX form: the copy gets the portable lowering
    lower = isinstance(model, torch.fx.GraphModule) and has_grouped_experts(model)
    if plan is None and not lower and weights_from is None and _float_dtypes(model) <= {dtype}:
        return model
    src = _dominant_float_dtype(model)
    originals = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    memo = dict(originals)  # deepcopy shares every tensor: nothing is copied here
    source = getattr(model, "__dict__", {}).get("_source_model")
    if source is not None:  # an AdaptedModel's reference to the caller's model: shared, never copied
        memo[id(source)] = source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch pytree LeafSpec deprecation on deepcopy
        clone = copy.deepcopy(model, memo)
    if source is not None and clone._modules.get("_source_model") is source:
        # GraphModule's deepcopy re-registers it as a submodule: keep it a plain reference
        del clone._modules["_source_model"]
        object.__setattr__(clone, "_source_model", source)
    lazy = _convert_tensors(model, clone, dtype, plan, lazy=(lazy_merge and plan is not None) or weights_from is not None,
                            weights_from=weights_from)
    if lazy is not None:
        clone.graphadapt_lazy_folds = lazy
    if "_compute_dtype" in getattr(clone, "__dict__", {}):  # tensors converted directly, not through .to()
        clone._compute_dtype = dtype
    if plan is not None:
        from graphadapt.passes.merge import apply_merge, plan_merge

        clone_plan = plan_merge(clone, None, safe=False, compute=False)  # same nodes, in the copy's graph
        run_pass("merge_adapters", lambda gm: apply_merge(gm, clone_plan), clone)
        clone.graphadapt_merge_report = {"folded": clone_plan.folded, "kept": clone_plan.kept}
    if isinstance(clone, torch.fx.GraphModule):
        drop_dtype_pins(clone)  # dtype decisions belong to retarget_graph_dtype; device pins stay
        if src != dtype:
            run_pass("retarget_dtype", retarget_dtype_pass, clone, src, dtype, cast_inputs(example_inputs, dtype))
        if lower:
            run_pass("lower_grouped_mm", lower_grouped_mm, clone)
    return clone


class LazyFold:
    """The merged value of one weight or bias of an export copy, computed when asked for.

    ``placeholder`` is the tensor the copy holds instead (same shape and dtype); ``value()``
    folds the chain from the source model and converts it (a new tensor each call, so the
    caller can write it and let it go: memory bounded by one weight)."""

    def __init__(self, model, chain, name: str, dtype: torch.dtype, placeholder: torch.Tensor, bias_cache: dict,
                 read=None):
        self.model, self.chain, self.name, self.dtype = model, chain, name, dtype
        self.placeholder, self._bias_cache, self.read = placeholder, bias_cache, read

    def value(self) -> torch.Tensor:
        chain = self.chain
        if chain is None:  # an unchanged base tensor read from a checkpoint (``weights_from``)
            return self.read(self.name).to(self.dtype)
        if self.name == chain.bias and chain.bias in self._bias_cache:
            return self._bias_cache.pop(chain.bias)
        with torch.no_grad():
            w2, b2 = _fold(self.model, chain, self.read)
            if self.name == chain.weight:
                if chain.bias is not None and b2 is not None:  # biases are small: keep it for its own turn
                    self._bias_cache[chain.bias] = b2.detach().to(self.dtype)
                return w2.detach().to(self.dtype)
            return b2.detach().to(self.dtype)


def _fold(model, chain, read=None):
    """``fold_chain`` of ``model``; with ``read`` (name → tensor or None) the base weight and bias it returns
    replace the model's own (hollow) ones."""
    from graphadapt.passes.merge import fold_chain

    if read is None:
        return fold_chain(model, chain, safe=True)
    w = read(chain.weight)
    b = read(chain.bias) if chain.bias is not None else None
    w2, b2 = fold_chain(model, chain, safe=True, weight=w, bias=b)
    if b is not None and b2 is b:  # an unchanged bias is the model's own, as without ``read``
        b2 = model.get_parameter(chain.bias)
    return w2, b2


def lazy_min_elements() -> int | None:
    """Tensors above this many elements can be merged lazily: torch.onnx's optimizer folds
    constants that large only through Transpose, which it computes as a view of the weight
    (never a copy), so the merged value can be put back behind every view. None when the
    installed onnxscript does not state its limit (then nothing is lazy)."""
    try:
        from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as limit
    except ImportError:
        return None
    return int(limit)


def _placeholder(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Same shape and dtype as ``t`` converted, no data work: a view (same dtype) or ``empty``
    (whose pages the kernel maps only when written)."""
    return t.detach().view(t.shape) if t.dtype == dtype else torch.empty(t.shape, dtype=dtype, device=t.device)


def _convert_tensors(model: torch.nn.Module, clone: torch.nn.Module, dtype: torch.dtype, plan,
                     lazy: bool = False, weights_from=None) -> dict[str, LazyFold] | None:
    """Put converted (and, with ``plan``, merged) tensors into ``clone``, one at a time.

    ``clone`` shares ``model``'s tensor objects (tied weights stay tied: one conversion per tensor).
    With ``lazy``, large merged tensors that nothing else shares are placeholders and the returned
    dict says how to compute them; small ones (which the exporter may fold into other constants)
    are merged here."""
    chains = {} if plan is None else {c.weight: c for c in plan.chains.values()}
    read = None if weights_from is None else weights_from.read_hollow
    by_bias = {c.bias: c for c in chains.values() if c.bias is not None}
    pending: dict[str, torch.Tensor | None] = {}  # folded values not yet placed (a bias met after its weight)
    lazy_folds: dict[str, LazyFold] = {}
    bias_cache: dict[str, torch.Tensor] = {}
    min_elements = lazy_min_elements() if lazy else None
    if weights_from is not None and min_elements is None:
        from graphadapt.errors import ExportError

        raise ExportError("exporting with weights_from needs onnxscript's constant-folding limit "
                          "(onnxscript.optimizer._constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT), which "
                          "this onnxscript does not state; upgrade onnxscript")
    uses: dict[int, int] = {}
    if min_elements is not None:
        for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            uses[id(t)] = uses.get(id(t), 0) + 1

    def folded(name: str, chain) -> torch.Tensor | None:
        if name not in pending:
            w2, b2 = _fold(model, chain, read)
            base_b = model.get_parameter(chain.bias) if chain.bias is not None else None
            pending[chain.weight] = w2.to(dtype)
            del w2
            if chain.bias is not None:
                pending[chain.bias] = None if b2 is base_b else b2.to(dtype)
        return pending.pop(name)

    def placeholder(name: str, chain, t: torch.Tensor) -> torch.Tensor | None:
        if name == chain.bias and chain.weight in lazy_folds:  # a small bias beside a lazy weight
            base_b = model.get_parameter(chain.bias)
            b2 = _fold(model, chain, read)[1]
            return None if b2 is base_b else b2.to(dtype)
        if name in pending or t.numel() <= min_elements or uses.get(id(t), 0) != 1 or not t.is_contiguous():
            return folded(name, chain)
        ph = _placeholder(t, dtype)
        lazy_folds[name] = LazyFold(model, chain, name, dtype, ph, bias_cache, read)
        return ph

    def hollow(name: str, t: torch.Tensor) -> torch.Tensor:
        """An unchanged base tensor that lives in the checkpoint: a placeholder, or its value when small."""
        if t.numel() <= min_elements or uses.get(id(t), 0) != 1 or not t.is_contiguous():
            return read(name).to(dtype)
        ph = _placeholder(t, dtype)
        lazy_folds[name] = LazyFold(model, None, name, dtype, ph, bias_cache, read)
        return ph

    done: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for mname, mod in clone.named_modules(remove_duplicate=False):
            for table in (mod._parameters, mod._buffers):
                for leaf, t in list(table.items()):
                    if t is None:
                        continue
                    full = f"{mname}.{leaf}" if mname else leaf
                    if id(t) not in done:
                        chain = chains.get(full) or by_bias.get(full)
                        if chain is None:
                            value = hollow(full, t) if read is not None and weights_from.is_hollow(full) else None
                        elif min_elements is not None:
                            value = placeholder(full, chain, t)
                        else:
                            value = folded(full, chain)
                        if value is None and chain is not None and read is not None and weights_from.is_hollow(full):
                            value = hollow(full, t)  # an unchanged (hollow) bias of a folded weight
                        if value is None and t.is_floating_point() and t.dtype != dtype:
                            value = t.detach().to(dtype)
                        if value is None:
                            done[id(t)] = t  # already in dtype, unchanged: shared
                        elif isinstance(t, torch.nn.Parameter):
                            done[id(t)] = torch.nn.Parameter(value, requires_grad=t.requires_grad)
                        else:
                            done[id(t)] = value
                    table[leaf] = done[id(t)]
    return lazy_folds if min_elements is not None else None


def _float_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _dominant_float_dtype(model: torch.nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


