"""``AdaptedModel``: the captured graph plus its adapters, as one ``nn.Module``.

Same call signature and output types as the source model; base parameters frozen
(their own ``Parameter`` objects over the caller's storage), adapter parameters
trainable under ``adapters.<name>.<site>``.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .capture import CapturedModule, SignatureMiss, serialised
from .console import describe, summary_notes
from .draw import draw_model
from .checkpoints import load_adapter_weights, save_adapters
from .checkpoints.merged import save_merged
from .checkpoints.peft_export import write_peft
from .checkpoints.pretrained import write_pretrained
from .checkpoints.trainer import set_trainable_state_dict
from .composition.insert import COMPOSE
from .composition.multitask import check_task_ids, coerce_task_ids
from .composition.route import (ROUTE_INPUT, check_adapter_ids, coerce_adapter_ids, example_ids, routing_input,
                                with_route_parameter)
from .concurrency import exclusive, reading
from .errors import GraphAdaptError, MergeError
from .hotswap import hot_swap, prepare_slots
from .inference import PipelineInterface
from .checkpoints.lifecycle import adapters_disabled
from .merging import Merger, MergeReport
from .arithmetic import add_weighted_adapter, to_low_rank
from .passes.portability import retarget
from .plan import PlanMode, build_plan, execute_plan
from .spec.composition import Block, block_from_dict
from .structure import recognize
from .version import __version__
from .vocab import ADAPTERS, adapter_prefix
from .hollow import HOLLOW_MARK, check_forward as check_hollow_forward, reading_checkpoint, refuse as refuse_hollow
from .quantized import Quantize, dense_base, has_quantized_weights, refuse_quantized, requantize_linears


@dataclass(frozen=True)
class ModelServices:
    """What an :class:`AdaptedModel` delegates to, injected at construction (``graphadapt.api`` builds the full
    set; a model built without it has merge and persistence, and says so for the rest). Explicit dependencies
    instead of a hook registry: the higher layers (call signatures, generation) hand their entry points in.

    * ``merger``: merge / unmerge / to_base_model (:class:`graphadapt.merging.Merger`);
    * ``signature_of(source) → (inspect.Signature | None, positional names | None)`` and
      ``route_call(model, args, kwargs)``: calls other than the captured signature (:mod:`graphadapt.signatures`);
    * ``set_checkpointing(model, enable, options)``: gradient checkpointing;
    * ``generate(model, input_ids, attention_mask, **kw)`` (:mod:`graphadapt.generation`), which builds cached
      twins with ``recapture(model, spec, **apply kwargs)`` (:func:`graphadapt.api.apply`);
    * ``reduce(model) → (callable, args)``: ``pickle`` / ``torch.save`` (:mod:`graphadapt.pickling`).
    """

    merger: Merger = field(default_factory=Merger)
    signature_of: Callable | None = None
    route_call: Callable | None = None
    set_checkpointing: Callable | None = None
    generate: Callable | None = None
    recapture: Callable | None = None
    reduce: Callable | None = None

    def __deepcopy__(self, memo):  # stateless: copies of a model share them
        return self

    def need(self, what: str, hint: str):
        fn = getattr(self, what)
        if fn is None:
            raise GraphAdaptError(f"this adapted model was built without the {what} service ({hint}); build it with "
                                  "graphadapt.apply / graphadapt.load")
        return fn


BASIC_SERVICES = ModelServices()


class SharedRefs:
    """Attributes kept by reference when the model is deep-copied (they hold read-only graphs)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __deepcopy__(self, memo):
        return self


def fusion_dropout(gm) -> float:
    """AdapterFusion's score dropout: the model's attention dropout, as AdapterHub takes it."""
    cfg = getattr(gm, "source_config", None)
    for key in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout_rate"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


class AdaptedModel(PipelineInterface, CapturedModule):
    """A captured model with adapters inserted. Create it with :func:`graphadapt.apply`."""

    _graphadapt_attrs = CapturedModule._graphadapt_attrs + (
        "spec", "adapter_records", "structure_report", "_merge_state", "_source_model", "_planning",
        "_call_signature", "_positional_names", "_route", "_checkpoint_options", "services", "_swap_slots",
        HOLLOW_MARK, "_quantize")

    services: ModelServices = BASIC_SERVICES
    """The services this model delegates to (:class:`ModelServices`; set by ``graphadapt.api``)."""

    def __new__(cls, *args, **kwargs):
        # torch.fx gives every GraphModule its own subclass (it holds that instance's generated forward), named
        # "GraphModuleImpl" in torch.fx.graph_module (GraphModule.__init__ renames it "GraphModule"): it is named
        # after the class the user has in recompile. fx recognises its per-instance classes by that name, so a copy
        # (deepcopy, copy) first steps back to the real class here.
        real = next(t for t in cls.__mro__ if "_graphadapt_instance_class" not in t.__dict__)
        obj = super().__new__(real)
        if type(obj) is not real:  # fx's fresh per-instance subclass: only this instance uses it
            type(obj)._graphadapt_instance_class = real
        return obj

    __repr__ = __str__ = describe  # what the user has (graphadapt/console.py); adapted.code: the graph
    draw = draw_model  # adapted.draw("model.svg"): layers, roles, adapters, composition (graphadapt/draw.py)
    accepts_loss_kwargs = False
    """For ``transformers.Trainer``: the loss is the source model's own (no ``num_items_in_batch``)."""

    def _init_adapted(self, spec, records: list, structure_report: dict, source: nn.Module, plan=None,
                      base_graph=None, services: ModelServices = BASIC_SERVICES):
        object.__setattr__(self, "services", services)
        self.spec = spec
        self.adapter_records = records      # list[graphadapt.passes.AdapterRecord]
        # the plan (what apply inserted where) and the captured graph before insertion (set_active re-plans
        # from it); both point into graphs that are only read, so copies of the model share them
        self._planning = SharedRefs(plan=plan, base_graph=base_graph)
        self.structure_report = structure_report
        self._merge_state = None
        object.__setattr__(self, "_source_model", source)  # not a submodule: shares storage only
        if not getattr(self, "decoder_cache", None) and services.signature_of is not None:
            # the source's call signature: other calls than the captured one are captured on first use
            self._call_signature, self._positional_names = services.signature_of(source)
            self.recompile()

    # ------------------------------------------------------------------ calls
    def _call_impl(self, *args, **kwargs):
        if HOLLOW_MARK in self.__dict__:  # unread base weights (graphadapt.outofcore.hollow_model): refuse
            check_hollow_forward(self)
        routed = routing_input(self.__dict__.get("input_names"))
        if routed is not None:  # Route's adapter_ids / MultiTask's task_ids
            if routed in kwargs:
                block = self.spec.composition
                kwargs[routed] = (coerce_adapter_ids(kwargs[routed]) if routed == ROUTE_INPUT else
                                  coerce_task_ids(kwargs[routed], block.children if block is not None else ()))
            self._check_routed_call(args, kwargs, routed)
        route = self.__dict__.get("_route")  # set while gradient checkpointing is enabled
        if route is None:
            try:
                with reading(self):  # a forward sees the state before or after a change (graphadapt.concurrency)
                    return super()._call_impl(*args, **kwargs)
            except SignatureMiss as miss:  # not the captured signature: graphadapt.signatures
                route = self.services.route_call if miss.module is self else None
                if route is None or self.__dict__.get("_call_signature") is None:
                    raise
        return route(self, args, kwargs)

    def example_inputs(self) -> dict:
        """The capture's example inputs (and, for a ``Route``, example ``adapter_ids`` covering -1 and the adapters;
        for a ``MultiTask``, ``task_ids`` covering the tasks)."""
        out = super().example_inputs()
        block = self.spec.composition
        routed = routing_input(self.__dict__.get("input_names"))
        if routed is not None and block is not None:
            batch = next((v.shape[0] for v in out.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 2)
            out[routed] = example_ids(batch, len(block.children), self._compute_device, base=routed == ROUTE_INPUT)
        return out

    def _check_routed_call(self, args, kwargs, routed: str = ROUTE_INPUT) -> None:
        """A Route model's ``adapter_ids`` (given, 1-D int, one per row, each in ``[-1, N)``): graphadapt.composition.route;
        a MultiTask model's ``task_ids`` (each in ``[0, N)``): graphadapt.composition.multitask."""
        names = list(self.input_names)
        bound = {**dict(zip(names, args)), **kwargs}
        ids = bound.get(routed)
        ref = next((v for k, v in bound.items() if k != routed and isinstance(v, torch.Tensor) and v.dim() > 0), None)
        block = self.spec.composition
        children = block.children if block is not None else ()
        batch = None if ref is None else ref.shape[0]
        if routed == ROUTE_INPUT:
            check_adapter_ids(ids, len(children), batch, children)
        else:
            check_task_ids(ids, children, batch)

    def recompile(self):
        impl = type(self)
        real = impl.__dict__.get("_graphadapt_instance_class")
        if real is not None:  # type(adapted) / repr of the class say AdaptedModel (see __new__)
            impl.__name__, impl.__qualname__, impl.__module__ = real.__name__, real.__qualname__, real.__module__
        out = super().recompile()
        sig = self.__dict__.get("_call_signature")
        if sig is not None:  # inspect.signature(model.forward) shows the source's (transformers.Trainer reads it)
            routed = routing_input(self.__dict__.get("input_names"))
            if routed is not None and routed not in sig.parameters:  # Route/MultiTask: adapter_ids/task_ids is a
                sig = with_route_parameter(sig, routed)             # named input (torch.export binds it so)
            type(self).forward.__signature__ = sig
        return out

    def __deepcopy__(self, memo):
        source = self.__dict__.get("_source_model")
        if source is not None:  # the caller's model: a shared reference, never copied
            memo.setdefault(id(source), source)
        res = super().__deepcopy__(memo)
        if res._modules.get("_source_model") is not None:  # Module.__setattr__ registered it: keep it a reference
            object.__setattr__(res, "_source_model", res._modules.pop("_source_model"))
        res.recompile()
        return res

    def __reduce__(self):  # pickle / torch.save: rebuilt from source model + spec + adapters (graphadapt.pickling)
        self._refuse_swap_slots("pickle")
        reduce = self.services.reduce
        return reduce(self) if reduce is not None else super().__reduce__()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each transformer layer's activations in the backward pass instead of keeping them
        (while training with gradients on); see docs/training.md."""
        self.services.need("set_checkpointing", "graphadapt.signatures")(self, True, gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.services.need("set_checkpointing", "graphadapt.signatures")(self, False, None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.__dict__.get("_route") is not None

    supports_gradient_checkpointing = True

    @property
    def plan(self):
        """The :class:`graphadapt.plan.Plan` this model's graph was built from."""
        return self._planning.plan

    # ------------------------------------------------------------------ parameters
    def adapter_names(self) -> list[str]:
        return list(self.spec.adapters)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def base_parameter_count(self) -> int:
        """Base weights, counted as the model's logical parameters: a quantized linear (packed bytes held as
        buffers, or as frozen byte parameters once sharded) counts ``in_features × out_features``."""
        from .quantized import PACKED

        packed = {n: m for n, m in self.named_modules() if isinstance(m, PACKED)}
        plain = sum(p.numel() for n, p in self.named_parameters() if not n.startswith(adapter_prefix())
                    and not (n.rpartition(".")[0] in packed and n.rpartition(".")[2] != "bias"))
        return plain + sum(m.in_features * m.out_features for m in packed.values())

    def adapter_parameter_count(self, name: str | None = None) -> int:
        prefix = adapter_prefix(name)
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(prefix))

    def summary(self, print_fn=print) -> str:
        """Table: adapter, method, sites, params, % of base, trainable."""
        base = self.base_parameter_count()
        rows = [("adapter", "method", "sites", "params", "% of base", "trainable", "active")]
        active = set(self.active_adapters())
        for name, method in self.spec.adapters.items():
            n = self.adapter_parameter_count(name)
            sites = sum(1 for r in self.adapter_records if r.adapter == name)
            train = sum(p.numel() for pn, p in self.named_parameters()
                        if pn.startswith(adapter_prefix(name)) and p.requires_grad)
            rows.append((name, type(method).__name__, str(sites), f"{n:,}", f"{100 * n / max(base, 1):.3f}",
                         f"{train:,}", "yes" if name in active else "no"))
        rows.append(("(base)", self.source_class.rsplit(".", 1)[-1], "", f"{base:,}", "100",
                     f"{sum(p.numel() for pn, p in self.named_parameters() if not pn.startswith(adapter_prefix()) and p.requires_grad):,}",
                     ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.is_merged:
            lines.append(f"merged: {len(self._merge_state['report'].folded)} module(s) folded")
        text = "\n".join(lines + summary_notes(self))
        if print_fn is not None:
            print_fn(text)
        return text

    # ------------------------------------------------------------------ activation
    def _adapter_modules(self, name: str | None = None) -> list[tuple[str, nn.Module]]:
        return [(r.target, self.get_submodule(r.target)) for r in self.adapter_records
                if name is None or r.adapter == name]

    def active_adapters(self) -> list[str]:
        if self.spec.composition is not None:
            return list(self.spec.composition.names())
        names = []
        for name in self.spec.adapters:
            mods = self._adapter_modules(name)
            if mods and all(getattr(m, "active", True) for _, m in mods):
                names.append(name)
        return names

    @property
    def active(self):
        """The active setup: a composition block, or the tuple of active adapter names."""
        return self.spec.composition or tuple(self.active_adapters())

    @serialised
    @exclusive
    def set_active(self, names) -> None:
        """Activate exactly ``names`` (``None``: all; inactive adapters pass their input through), or a
        composition block (``Stack``, ``Fuse``, ``Parallel``, ``BatchSplit``, ``Average``, ``Route``).

        A block — or leaving one — re-plans from the captured base graph (no re-capture): trained
        adapter weights (and fusion layers) are kept, composition modules rebuilt. A setup the plan
        refuses raises :class:`~graphadapt.errors.SpecError` and leaves the model as it was.
        """
        if self.is_merged:
            raise GraphAdaptError("unmerge() before changing the active adapters")
        if isinstance(names, dict):
            names = block_from_dict(names)
        if not (names is None or isinstance(names, (str, Block)) or (
                isinstance(names, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in names))):
            raise GraphAdaptError(f"set_active takes an adapter name, a list of names, None (all) or a composition "
                                  f"block (Stack, Fuse, …), got {names!r}; this model has {list(self.spec.adapters)}")
        if isinstance(names, Block) or self.spec.composition is not None:
            active = names if isinstance(names, Block) or names is None else (
                (names,) if isinstance(names, str) else tuple(names))
            self._replan(self.spec.replace(active=active))
            if not isinstance(names, Block):
                self._set_flags(self.spec.active_names)
            return
        want = tuple(self.spec.adapters) if names is None else ((names,) if isinstance(names, str) else tuple(names))
        selects = [c for c in self.plan.combinations if c.mode == PlanMode.SELECT]
        if selects and set(want) != set(self.spec.active_names):
            # a select site wires only the one active adapter there: another choice re-plans (two is refused)
            self._set_flags(want)  # unknown names are named before re-planning
            self._replan(self.spec.replace(active=want))
        self._set_flags(want)

    @exclusive
    def _set_flags(self, names) -> None:
        want = set(names)
        unknown = want - set(self.spec.adapters)
        if unknown:
            raise GraphAdaptError(f"unknown adapter(s) {sorted(unknown)}; this model has {list(self.spec.adapters)}")
        for r in self.adapter_records:
            if r.adapter in self.spec.adapters:
                self.get_submodule(r.target).active = r.adapter in want

    def _replan(self, spec) -> None:
        """Rebuild the adapted graph from the base graph for ``spec`` (modules already built are reused)."""
        if self._planning.base_graph is None:
            raise GraphAdaptError("this model keeps no base graph to re-plan from (built by an older graphadapt)")
        old_graph, old_modules = self.graph, dict(self.get_submodule(ADAPTERS).named_children())
        compose = old_modules.get(COMPOSE)  # the composition pass replaces modules under it in place
        old_compose = {n: m for n, m in compose.named_modules() if n and not m._modules} if compose else {}
        try:
            self.graph = self.snapshot_graph(self._planning.base_graph)
            the_plan = build_plan(recognize(self), spec)
            with reading_checkpoint(self, self.__dict__.get("_source_model")):  # a hollow base: W read there
                records = execute_plan(self, the_plan, dropout=fusion_dropout(self),
                                       base_seed=spec.effective_seed(None))
        except BaseException:
            holder = self.get_submodule(ADAPTERS)
            for name in list(holder._modules):
                if name not in old_modules:
                    del holder._modules[name]
            for name, mod in old_compose.items():  # the old graph calls these composition modules
                self.add_submodule(f"{ADAPTERS}.{COMPOSE}.{name}", mod)
            self.graph = old_graph
            self.recompile()
            raise
        retarget(self, self._compute_device, self._compute_dtype)
        self.spec, self.adapter_records = spec, records
        self._planning = SharedRefs(plan=the_plan, base_graph=self._planning.base_graph)
        composed = set(spec.composition.names()) if spec.composition is not None else set(spec.adapters)
        for r in records:
            if r.adapter in spec.adapters:
                self.get_submodule(r.target).active = r.adapter in composed
        self.train(self.training)

    def train(self, mode: bool = True):
        """Training mode; refused on a merged model (the folded adapters no longer run): unmerge() first."""
        if mode and getattr(self, "_merge_state", None) is not None:
            raise MergeError("this model is merged: adapters folded into the base weights receive no gradients. "
                             "Call unmerge() before training (or train, then merge).")
        return super().train(mode)

    # ------------------------------------------------------------------ lifecycle
    @serialised
    @exclusive
    def add_adapter(self, name: str, method) -> None:
        """Insert a new adapter ``name`` (a method spec, e.g. ``LoRA(r=8)``) by re-planning from the captured
        base graph; existing adapters keep their trained weights and activation. The new adapter starts
        inactive (as in PEFT): ``set_active`` it to train or use it. A plan that refuses leaves the model as it was."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before adding an adapter")
        if name in self.spec.adapters or name in self.spec.module_owners:
            raise GraphAdaptError(f"adapter {name!r} already exists; this model has {list(self.spec.adapters)}")
        active = self.active_adapters()
        spec = self.spec.replace(adapters={**self.spec.adapters, name: method})
        self._replan(spec)
        if spec.composition is None:
            self._set_flags(active)

    @serialised
    @exclusive
    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (its modules and weights) by re-planning from the captured base graph."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before deleting an adapter")
        if name not in self.spec.adapters:
            raise GraphAdaptError(f"unknown adapter {name!r}; this model has {list(self.spec.adapters)}")
        if len(self.spec.adapters) == 1:
            raise GraphAdaptError(f"{name!r} is the only adapter; use to_base_model() or the base model instead")
        comp = self.spec.composition
        if comp is not None and name in comp.names():
            raise GraphAdaptError(f"adapter {name!r} is part of the active composition {comp}; set_active(...) "
                                  "without it first")
        active = [n for n in self.active_adapters() if n != name]
        kept = self.spec.active if comp is not None or self.spec.active is None else \
            tuple(n for n in self.spec.active if n != name)
        spec = self.spec.replace(adapters={k: v for k, v in self.spec.adapters.items() if k != name}, active=kept)
        self._replan(spec)
        holder = self.get_submodule(ADAPTERS)
        if name in holder._modules:
            del holder._modules[name]
        if comp is None:
            self._set_flags(active)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str | None = None, *,
                             svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None,
                             density: float | None = None, majority_sign_method: str = "total",
                             seed: int = 0) -> None:
        """A new adapter ``adapter_name`` combining ``adapters`` (one method) with ``weights`` — PEFT's
        ``add_weighted_adapter``, same arguments and numbers: LoRA takes every PEFT ``combination_type`` (default
        ``"svd"``; ``linear``, ``cat``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their
        ``_svd`` forms, with ``density``, ``majority_sign_method``, ``svd_rank``, ``svd_clamp``…), IA3 combines
        linearly. The random DARE masks come from a generator seeded with ``seed`` (PEFT after
        ``torch.manual_seed(seed)`` draws the same). The new adapter is a normal one (trainable, saveable,
        mergeable), added inactive: ``set_active`` it. See docs/methods.md, "Adapter arithmetic"."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                             svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                             density=density, majority_sign_method=majority_sign_method, seed=seed)

    def to_low_rank(self, adapter: str, rank: int, name: str) -> None:
        """A new low-rank adapter ``name`` (a LoRA of rank ``rank``, scaling 1) whose update is the best rank-``rank``
        approximation (truncated SVD) of the change ``adapter`` makes to each weight it folds into (``fold(W) −
        W``; a changed bias becomes the LoRA's ``lora_bias``), so runtimes serving only LoRA can serve any mergeable
        method. ``rank >= min(out, in)`` reproduces the adapter. Added inactive: ``set_active`` it."""
        to_low_rank(self, adapter, rank, name)
    def average_adapter(self, name: str, adapter_list, weights=None, combine_strategy: str = "linear",
                        normalize_weights: bool = True, overwrite_ok: bool = False, set_active: bool = False,
                        svd_rank: int | None = None) -> None:
        """AdapterHub's ``average_adapter``: add ``name`` as the weighted average of ``adapter_list``
        (``combine_strategy``: ``linear``; LoRA also ``lora_linear_only_negate_b``, ``lora_delta_w_svd`` with
        ``svd_rank``). See :mod:`graphadapt.averaging`."""
        from .averaging import average_adapter

        average_adapter(self, name, adapter_list, weights=weights, combine_strategy=combine_strategy,
                        normalize_weights=normalize_weights, overwrite_ok=overwrite_ok, set_active=set_active,
                        svd_rank=svd_rank)

    def disable_adapters(self):
        """Context manager: inside it every adapter passes its input through (outputs equal the base
        model's); the previous activation is restored on exit, also on an exception."""
        return adapters_disabled(self)

    def print_trainable_parameters(self, print_fn=print) -> str:
        """PEFT's one-line summary: ``trainable params: X || all params: Y || trainable%: Z``."""
        seen, total, train = set(), 0, 0
        for p in self.parameters():
            key = (p.data_ptr(), p.shape, p.dtype)  # storage shared by tied weights counts once
            if key in seen:
                continue
            seen.add(key)
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
        line = f"trainable params: {train:,d} || all params: {total:,d} || trainable%: {100 * train / max(total, 1):.4f}"
        if print_fn is not None:
            print_fn(line)
        return line

    # ------------------------------------------------------------------ fusion
    def fusion_layers(self) -> dict[str, nn.Module]:
        """``{qualified name: FusionLayer}`` of every AdapterFusion layer in the active composition."""
        return {r.target: self.get_submodule(r.target) for r in self.adapter_records if r.method == "fusion"}

    def train_fusion(self, unfreeze_adapters: bool = False) -> None:
        """Training mode for AdapterFusion: only the fusion layers train (and the fused adapters too
        with ``unfreeze_adapters=True``); the base stays frozen. Like AdapterHub's ``train_adapter_fusion``."""
        fusion = {r.target for r in self.adapter_records if r.method == "fusion"}
        if not fusion:
            raise GraphAdaptError("no fusion layer: set_active(Fuse(...)) first")
        fused = set(self.spec.composition.names()) if self.spec.composition is not None else set()
        for n, p in self.named_parameters():
            if not n.startswith(adapter_prefix()):
                continue
            in_fusion = any(n.startswith(t + ".") for t in fusion)
            owner = n.split(".")[1]
            p.requires_grad_(in_fusion or (unfreeze_adapters and owner in fused))
        self.train()

    def fusion_regularization(self):
        """AdapterHub's fusion regularisation ``Σ 0.01·‖I − V‖²`` over the fusion layers with a trainable
        value matrix (a scalar tensor; 0 when there is none). Add it to the training loss."""
        terms = [t for m in self.fusion_layers().values() if (t := m.regularization()) is not None]
        if not terms:
            ref = next(self.parameters())
            return torch.zeros((), dtype=ref.dtype, device=ref.device)
        return torch.stack(terms).sum()

    def snapshot_graph(self, graph=None):
        """A deep copy of ``graph`` (default: the current one) with its node metadata."""
        with warnings.catch_warnings():  # torch's own TreeSpec deprecation inside Graph deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(self.graph if graph is None else graph)

    # ------------------------------------------------------------------ merge (the Merger service)
    @property
    def is_merged(self) -> bool:
        return self._merge_state is not None

    @serialised
    @exclusive
    def merge(self, names: Iterable[str] | None = None, safe: bool = True, strict: bool = False,
              in_place: bool = False, keep_backup: bool = True) -> MergeReport:
        """Fold every adapter module that can (``mergeable`` / ``fold``: LoRA, DoRA, IA3, …) into the base weights.

        Memory (see docs/scale.md):

        * default: merged weights are *new* tensors (one extra copy of each merged weight);
          the caller's model keeps the originals, which :meth:`unmerge` re-installs.
        * ``in_place=True``: writes into the storage shared with the caller's model — the
          caller's model changes too — and keeps a backup copy of each merged weight for
          :meth:`unmerge` (same extra memory as the default).
        * ``in_place=True, keep_backup=False``: writes into that storage with no backup: no
          extra memory beyond one weight at a time, but *irreversible* — the caller's model
          stays merged and :meth:`unmerge` raises :class:`MergeError`.

        ``safe=True`` never installs a non-finite weight: non-finite adapter parameters are
        refused before anything changes; a merged weight that overflows is refused before it
        is written (reversible modes then restore every weight; without a backup the weights
        merged before it stay merged, and the error names them).
        ``strict=True`` raises :class:`MergeError` if any selected adapter cannot fold.
        """
        refuse_hollow(self, "merge()")
        refuse_quantized(self, "merge", "Folding into packed 4-bit weights would change the quantized base; "
                         "fold into a dense copy with to_base_model() (requantize=True to quantize it again) or "
                         "save_merged(), or export_onnx(merge=True).", MergeError)
        return self.services.merger.merge(self, names, safe=safe, strict=strict, in_place=in_place,
                                          keep_backup=keep_backup)

    @serialised
    @exclusive
    def unmerge(self) -> None:
        """Restore the exact pre-merge weights and graph (kept, never recomputed by subtraction)."""
        self.services.merger.unmerge(self)

    def to_base_model(self, names: Iterable[str] | None = None, requantize=None) -> nn.Module:
        """A copy of the source Hugging Face model with merged weights (PEFT's ``merge_and_unload``).

        Every selected adapter must fold (raises :class:`MergeError` otherwise). The
        adapted model itself is left as it was. Memory: one full copy of the base model.

        Over a quantized (bitsandbytes 4-bit) base the copy is dense: the dequantized base plus the
        adapters' deltas, in the compute dtype. ``requantize=True`` (or ``"nf4"``/``"fp4"``/a
        :class:`graphadapt.quantized.Quantize`) quantizes the merged linears again (bitsandbytes
        ``Linear4bit``, the base's own quantization for ``True``) and attaches the error that adds
        against the dense merge as ``model.graphadapt_requantization`` (``max_abs``, ``max_rel_fro``,
        ``worst``).
        """
        refuse_hollow(self, "to_base_model()")
        if not has_quantized_weights(self):
            if requantize:
                raise MergeError("requantize= applies to a model over a quantized base; this base is dense")
            return self.services.merger.to_base_model(self, names)
        with dense_base(self) as dense:
            refuse_hollow(self, "to_base_model()", self.__dict__.get("_source_model"))
            out = self.services.merger.to_base_model(self, names)
        if requantize:
            if requantize is True and dense.quantize is None:
                raise MergeError(f"requantize=True repeats the base's 4-bit quantization; this base is {dense.kind}: "
                                 "pass requantize='nf4' or 'fp4'")
            config = dense.quantize if requantize is True else Quantize.parse(requantize)
            out.graphadapt_requantization = requantize_linears(out, dense.paths, config)
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Decode with a KV cache (causal LMs); see :func:`graphadapt.generation.generate`.

        On a model captured without ``cache=True`` the first call builds a cached capture that
        shares this model's parameters (adapters, active set and merge state are mirrored).
        """
        return self.services.need("generate", "graphadapt.generation")(self, input_ids, attention_mask, **kwargs)

    def save_merged(self, directory, names: Iterable[str] | None = None, *, max_shard_size="5GB",
                    dtype=None, safe: bool = True, overwrite: bool = False) -> list:
        """Write the merged model as a Hugging Face checkpoint (``config.json`` + safetensors,
        sharded above ``max_shard_size``) into ``directory``, loadable by the source class's
        ``from_pretrained``. Streams one tensor at a time: extra memory is one merged weight;
        this model and the caller's are not changed. See :func:`graphadapt.checkpoints.merged.save_merged`.
        """
        return save_merged(self, directory, names, max_shard_size=max_shard_size, dtype=dtype, safe=safe,
                           overwrite=overwrite)

    # ------------------------------------------------------------------ checkpoints
    def save_adapters(self, directory, names=None, overwrite: bool = False):
        """Write ``spec.json`` + ``adapters.safetensors`` (adapter weights only) to ``directory``."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before saving adapters (merged weights live in the base)")
        self._refuse_swap_slots("save", names)
        return save_adapters(self, directory, names, overwrite=overwrite)

    def save_pretrained(self, save_directory, names=None, state_dict=None, safe_serialization: bool = True,
                        is_main_process: bool = True, overwrite: bool = False, **kwargs):
        """Write the adapters (and ``modules_to_save``; never the base weights) with an ``adapter_config.json``
        naming the base model class and its structure fingerprint; load with :func:`graphadapt.from_pretrained`.

        Accepts the arguments Hugging Face's ``Trainer`` passes: ``state_dict`` (ignored: the weights come
        from this model, which is what Trainer passes anyway), ``safe_serialization`` (only ``True``:
        graphadapt writes safetensors), ``is_main_process`` (``False``: write nothing); other keyword
        arguments (``max_shard_size``, ``push_to_hub``…) are refused by name. ``names`` (or PEFT's
        ``selected_adapters``): save only those adapters."""
        if "selected_adapters" in kwargs and names is None:  # PEFT's spelling
            names = kwargs.pop("selected_adapters")
        if kwargs:
            raise GraphAdaptError(f"save_pretrained does not support {sorted(kwargs)} (adapter checkpoints are one "
                                  "small safetensors file, written locally)")
        if not safe_serialization:
            raise GraphAdaptError("graphadapt writes safetensors only (safe_serialization=False is not supported)")
        if self.is_merged:
            raise GraphAdaptError("unmerge() before saving adapters (merged weights live in the base)")
        if not is_main_process:
            return None
        self._refuse_swap_slots("save", names)
        return write_pretrained(self, save_directory, names, overwrite=overwrite)

    def to_peft(self, directory, name: str | None = None, overwrite: bool = False):
        """Write adapter ``name`` (default: the only one) and the ``modules_to_save`` in PEFT's format, for
        ``peft.PeftModel.from_pretrained(base, directory)``; LoRA (incl. rsLoRA, DoRA) and IA3 at whole
        linear layers. See :mod:`graphadapt.checkpoints.peft_export`."""
        self._refuse_swap_slots("export to PEFT", None if name is None else [name])
        return write_peft(self, directory, name, overwrite=overwrite)

    def trainable_state_dict(self, enabled: bool = True) -> AdaptedModel:
        """With ``enabled``, ``state_dict()`` holds only the adapters and ``modules_to_save`` and
        ``load_state_dict`` does not report the base weights as missing: Hugging Face ``Trainer`` checkpoints
        of this model (``model.safetensors``, written from ``state_dict()`` for any model that is not a
        ``PreTrainedModel``) then hold no base weights, and ``resume_from_checkpoint`` restores them exactly.
        Returns the model."""
        set_trainable_state_dict(self, enabled)
        return self

    @exclusive
    def load_adapters(self, directory, strict: bool = True) -> list[str]:
        """Load adapter weights saved by :meth:`save_adapters` into this model."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before loading adapters")
        return load_adapter_weights(self, directory, strict=strict)

    # ------------------------------------------------------------------ hot-swap (graphadapt/hotswap.py)
    @serialised
    @exclusive
    def prepare_hot_swap(self, max_rank: int | None = None, names=None) -> dict[str, int | None]:
        """Make adapters ``names`` (default: all) swap slots of rank ``max_rank`` (zero-padded, exact; scaling
        folded into the tensors): same outputs, and later :meth:`hot_swap` calls change no shape. Call it before
        ``torch.compile``. Returns ``{adapter: slot rank}``. See docs/deployment.md, "Hot-swap"."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before preparing hot-swap slots")
        ranks = prepare_slots(self, max_rank, names)
        self._swap_slots = {**(self.__dict__.get("_swap_slots") or {}), **ranks}
        return ranks

    def _refuse_swap_slots(self, what: str, names=None) -> None:
        """Slots hold padded tensors with the scaling folded in (and, after a swap, another adapter's weights):
        they no longer match their spec, so writing them under it would load wrongly."""
        slots = self.__dict__.get("_swap_slots") or {}
        names = list(self.spec.adapters) if names is None else ([names] if isinstance(names, str) else list(names))
        hit = [n for n in names if n in slots]
        if hit:
            raise GraphAdaptError(f"cannot {what} adapter(s) {hit}: they are hot-swap slots (prepare_hot_swap: rank "
                                  "padded, scaling folded into the tensors), which no longer match their spec; "
                                  f"{what} the adapters you swap in from their own models or checkpoints instead")

    @serialised
    @exclusive
    def hot_swap(self, name: str, source, adapter: str | None = None) -> dict[str, int]:
        """Load another adapter into slot ``name`` in place, without changing the graph (a compiled model does
        not recompile). ``source``: an adapted model of the same base (its adapter ``adapter``, default its only
        one), a checkpoint directory (graphadapt or PEFT), or ``{"<site>.<param>": tensor}`` in slot form. Same
        sites, method and options, rank at most the slot's; anything else raises and leaves the model as it was."""
        if self.is_merged:
            raise GraphAdaptError("unmerge() before hot-swapping an adapter (merged weights live in the base)")
        return hot_swap(self, name, source, adapter, recapture=self.services.recapture,
                        base=getattr(self, "_source_model", None))

    # ------------------------------------------------------------------ metadata
    def graphadapt_metadata(self) -> dict[str, str]:
        meta = {"graphadapt_version": __version__, "graphadapt_spec": self.spec.to_json(),
                "source_class": self.source_class, "merged": str(self.is_merged).lower()}
        if getattr(self, "decoder_cache", None):
            meta["graphadapt.decoder_cache"] = json.dumps(self.decoder_cache, sort_keys=True)
        return meta
